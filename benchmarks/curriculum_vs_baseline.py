"""The claim, measured: MAE with the EfficientTrain curriculum vs plain MAE, in wall time and accuracy.

    python benchmarks/curriculum_vs_baseline.py --study configs/study/imagenette_vit-s16_200e.yaml \
        [--data /data/imagenette] [--out DIR] [--seeds 0 1] [--launch auto|subprocess|inprocess]

One model size and one schedule length E (the study config, `configs/study/*.yaml`); four runs, each
with every seed:
  baseline             plain MAE, E epochs
  et                   the `et` curriculum, E epochs
  etpp_half            the `etpp` curriculum, a compute budget of E/2 full-size-epoch equivalents
  baseline_equal_time  plain MAE given et's wall time: a full run of E' = E * wall(et) / wall(baseline)
                       epochs of the same seed (rounded to a whole step), its warmup + cosine schedule
                       ending at E', not a truncated E-epoch run
Every run warms up over the same share (`warmup_fraction`) of its own budget. Each encoder is then
evaluated the same way on the validation split: weighted kNN (cls and mean features), the linear probe
on cached features (the loop of `linprobe.mode=cached`), and a short fine-tune.

Wall time is the training time the engine measures itself (`elapsed_s` of the last metrics.jsonl
record: the loop only, after data and model set-up, before the final checkpoint write); `process_s`
is the whole launch (interpreter start, data decode, model build, final checkpoint). Nothing inside
the timed loop but training: periodic checkpoints, reconstruction grids, the kNN monitor and W&B are
switched off for every run. With `train.compile` on, one throwaway step per curriculum size of every
run first fills a study-local inductor cache, so no run is charged for a compile that an earlier run
happened to pay (each run still traces its own graphs, as any real run would). `steady_s` is for
reading a short study only: each stage at the median rate of its logged windows, leaving out its first
window (where a new size is traced); the verdicts use the measured wall time.

Over seeds: mean, half-range ((max - min) / 2: "within the baseline's seed spread" means at or above
its worst seed) and the sample std. Fine-tune top-1 is the last epoch's (no selection on val).

Launch: `subprocess` (the default on a GPU) runs each pretraining as `python pretrain.py ...` in a
fresh process: runs cannot leak memory, compiled graphs or Accelerate state into each other.
`inprocess` (the default on a CPU, where importing torch costs more than a tiny run) calls
`mae_et.engine.pretrain` in this process with Accelerate's state reset. Evaluation always runs in this
process, after all pretraining, so this process leaves the GPU alone while runs are timed.

Output under `--out` (default runs/study/<study name>/): results.json (every per-run, per-seed number,
mean and spread over seeds, speed-ups, verdicts, device and date), table.md, accuracy_vs_wall_time.png;
results_partial.json (rewritten after every run: what a study cut off by a time limit leaves);
runs/ (pretraining run folders), eval/ (fine-tune folders), logs/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.state import AcceleratorState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mae_et.checkpoint import META_FILE, list_checkpoints  # noqa: E402
from mae_et.config import ConfigError, curriculum_stages, load_pretrain_config  # noqa: E402
from mae_et.curriculum import plan_curriculum  # noqa: E402
from mae_et.data import scan_image_folder  # noqa: E402
from mae_et.engine import build_accelerator, build_model, mask_noise, pretrain  # noqa: E402
from mae_et.finetune_config import load_finetune_config  # noqa: E402
from mae_et.finetune_engine import finetune  # noqa: E402
from mae_et.flops import mae_train_flops_per_image  # noqa: E402
from mae_et.knn import build_eval_loader, knn_accuracy  # noqa: E402
from mae_et.linprobe_engine import fit_probe_on_features  # noqa: E402
from mae_et.optim import build_adamw  # noqa: E402
from mae_et.step import TrainStep  # noqa: E402
from mae_et.tracking import METRICS_FILE  # noqa: E402
from mae_et.vit import load_pretrained_vit, pool_tokens  # noqa: E402

RUNS = ("baseline", "et", "etpp_half", "baseline_equal_time")
EQUAL_TIME = "equal_time"  # the budget of the run that gets et's wall time
ACCURACY_KEYS = ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1")
SUMMARY_KEYS = ("epochs", "steps", "wall_s", "steady_s", "process_s", "s_per_epoch", "images_per_sec", "final_loss", "pflop",
                *ACCURACY_KEYS, "finetune_best_top1")
NEVER = 10**9  # checkpoint.every_steps: only the final checkpoint, written after the timed loop


class StudyError(RuntimeError):
    """A study that cannot run as configured, or a run that failed; one line (plus a log tail)."""


# ----------------------------------------------------------------------------- the study config


@dataclass
class RunSpec:
    budget: float | str  # a multiple of E (epochs, or full-size-epoch compute for etpp), or "equal_time"
    overrides: list[str]


@dataclass
class Study:
    name: str
    path: Path
    data_root: Path | None
    seeds: list[int]
    recipe: Path  # the pretraining base recipe
    epochs: float  # E
    warmup_fraction: float
    overrides: list[str]  # pretraining overrides shared by every run
    runs: dict[str, RunSpec]
    eval: dict[str, Any]
    finetune_recipe: Path
    finetune_overrides: list[str]
    reference: dict[str, Any]
    targets: dict[str, float]
    peak_tflops: float
    assumed_mfu: float
    raw: dict[str, Any]


def dotted(mapping: dict | None) -> list[str]:
    """{'model.size': 'small'} -> ['model.size="small"']: JSON is YAML, so each value parses back as written."""
    return [f"{key}={json.dumps(value)}" for key, value in (mapping or {}).items()]


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config '{path}' does not exist; pass --study configs/study/<name>.yaml")
    path = path.resolve()  # recipe paths are relative to it, whatever the folder a (sub)process runs in
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        pre, ev = raw["pretrain"], raw["eval"]
        if sorted(raw["runs"]) != sorted(RUNS):
            raise StudyError(f"{path}: runs must be exactly {', '.join(RUNS)}; got {', '.join(raw['runs'])}")
        runs = {name: RunSpec(spec["budget"], dotted(spec.get("overrides"))) for name, spec in raw["runs"].items()}
        for name, spec in runs.items():
            if spec.budget != EQUAL_TIME and not (isinstance(spec.budget, (int, float)) and spec.budget > 0):
                raise StudyError(f"{path}: runs.{name}.budget must be a positive multiple of E or '{EQUAL_TIME}'")
        return Study(
            name=raw["name"], path=path,
            # relative data roots are the repository's (e.g. .data/imagenette, ../shared/data/...)
            data_root=REPO / raw["data_root"] if raw.get("data_root") else None,
            seeds=[int(s) for s in raw["seeds"]],
            recipe=path.parent / pre["recipe"], epochs=float(pre["epochs"]), warmup_fraction=float(pre["warmup_fraction"]),
            overrides=dotted(pre.get("overrides")), runs=runs, eval=ev,
            finetune_recipe=path.parent / ev["finetune"]["recipe"], finetune_overrides=dotted(ev["finetune"].get("overrides")),
            reference=raw["reference"], targets=raw["targets"],
            peak_tflops=float(raw["flops"]["peak_tflops"]), assumed_mfu=float(raw["flops"]["assumed_mfu"]), raw=raw,
        )
    except KeyError as e:
        raise StudyError(f"{path}: missing key {e}; see configs/study/mini_cpu-smoke.yaml for the layout") from None


def run_name(run: str, seed: int) -> str:
    return f"{run}_seed{seed}"


def pretrain_overrides(study: Study, run: str, seed: int, epochs: float, data_root: Path, out: Path) -> list[str]:
    """Every override of one pretraining: the study's, the run's, then what the study fixes for all."""
    return [
        *study.overrides, *study.runs[run].overrides,
        f"data.root={json.dumps(str(data_root))}", f"output_dir={json.dumps(str(out / 'runs'))}",
        f"name={run_name(run, seed)}", f"train.seed={seed}", f"train.epochs={epochs!r}",
        f"optim.warmup_epochs={study.warmup_fraction * epochs!r}",
        # the timed loop holds training only: the one checkpoint is written after it, no grids, no kNN, no W&B
        f"checkpoint.every_steps={NEVER}", "checkpoint.resume=false", "tracking.recon_every_epochs=0",
        "tracking.knn_every_epochs=0", 'tracking.wandb="off"',
    ]


def pretrain_command(recipe: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "pretrain.py"), "--config", str(recipe), *overrides]


# ----------------------------------------------------------------------------- compute accounting


def planned_stages(cfg, steps_per_epoch: int) -> list[tuple[int, int]]:
    """[(B, steps)] of a run, as the engine lays it out."""
    stages, budget = curriculum_stages(cfg)
    plan = plan_curriculum(stages, budget, cfg.train.epochs, steps_per_epoch, cfg.data.crop_size)
    return [(s.size, s.num_steps) for s in plan.stages]


def train_flops(cfg, stages: list[tuple[int, int]]) -> float:
    m = cfg.model
    batch = cfg.train.batch_size * cfg.train.accum_steps
    return sum(steps * batch * mae_train_flops_per_image(m.size, size, m.patch_size, m.decoder_embed_dim, m.decoder_depth,
                                                           m.mask_ratio) for size, steps in stages)


# ----------------------------------------------------------------------------- pretraining


def launch_pretrain(cfg_recipe: Path, overrides: list[str], log_path: Path, launch: str, env: dict) -> float:
    """One pretraining run, to its end; returns the wall time of the whole launch (s)."""
    t0 = time.perf_counter()
    if launch == "subprocess":
        with open(log_path, "w") as log:
            proc = subprocess.run(pretrain_command(cfg_recipe, overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env=env)
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise StudyError(f"pretraining failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    else:
        AcceleratorState._reset_state(True)  # each run builds its own Accelerator
        with open(log_path, "w") as log, redirect_stdout(log):
            pretrain(load_pretrain_config(cfg_recipe, overrides))
    return time.perf_counter() - t0


def read_pretrain_run(run_dir: Path, cfg, process_s: float) -> dict[str, Any]:
    """The numbers of a finished run, from its metrics.jsonl and final checkpoint."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    ckpts = list_checkpoints(run_dir / "checkpoints")
    meta = json.loads((ckpts[-1] / META_FILE).read_text()) if ckpts else {}
    if not meta.get("complete"):
        raise StudyError(f"run {run_dir} did not finish (no complete final checkpoint)")
    steps, global_batch = meta["step"], meta["global_batch"]
    steps_per_epoch = round(steps / meta["epoch"])  # meta epoch = steps / steps_per_epoch
    # time per curriculum stage: each logged window (train.log_every steps) counts for the stage of its last
    # step, so a window that straddles a stage change (at most log_every steps) goes to the later stage
    per_size: dict[int, dict[str, Any]] = {}
    prev_step, prev_t = 0, 0.0
    for r in records:
        s = per_size.setdefault(r["size"], {"size": r["size"], "steps": 0, "seconds": 0.0, "windows": []})
        s["steps"] += r["step"] - prev_step
        s["seconds"] += r["elapsed_s"] - prev_t
        s["windows"].append(r["images_per_sec"])
        prev_step, prev_t = r["step"], r["elapsed_s"]
    for s in per_size.values():
        windows = s.pop("windows")
        s["images_per_sec"] = s["steps"] * global_batch / s["seconds"]
        # a stage's first window holds its one-time start (tracing the graph of a new size, first allocations):
        # the median of the others is the stage's steady rate, for a wall time without those starts
        s["steady_images_per_sec"] = statistics.median(windows[1:] or windows)
    stages = sorted(per_size.values(), key=lambda s: s["size"])
    wall = records[-1]["elapsed_s"]
    epochs_seen = steps / steps_per_epoch  # epochs of images (a compute budget runs more than its E)
    plan = planned_stages(cfg, steps_per_epoch)
    if sum(n for _, n in plan) != steps:
        raise StudyError(f"run {run_dir}: {steps} steps done, the plan has {sum(n for _, n in plan)}")
    flops = train_flops(cfg, plan)
    return {
        "run_dir": str(run_dir), "schedule": cfg.curriculum.schedule, "epochs": cfg.train.epochs,
        "steps": steps, "steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "epochs_of_images": epochs_seen,
        "wall_s": wall, "process_s": process_s, "s_per_epoch": wall / epochs_seen,
        "images_per_sec": steps * global_batch / wall,
        "steady_s": sum(s["steps"] * global_batch / s["steady_images_per_sec"] for s in stages), "stages": stages,
        "final_loss": records[-1]["loss"], "pflop": flops / 1e15, "achieved_tflops": flops / wall / 1e12,
    }


def equal_time_budget(epochs: float, et_wall: float, baseline_wall: float, steps_per_epoch: int) -> tuple[float, int]:
    """E' = E * wall(et) / wall(baseline), rounded to a whole step (half up, as the curriculum planner)."""
    steps = max(1, math.floor(epochs * et_wall / baseline_wall * steps_per_epoch + 0.5))
    return steps / steps_per_epoch, steps


def warm_compile(study: Study, data_root: Path, out: Path) -> None:
    """One throwaway step per curriculum size of every run, compiled exactly as the runs will compile it:
    fills the inductor cache, so that no run pays a compile that another run would have found cached."""
    for run, spec in study.runs.items():
        if spec.budget == EQUAL_TIME:
            continue  # the baseline's graph
        AcceleratorState._reset_state(True)
        cfg = load_pretrain_config(study.recipe, pretrain_overrides(study, run, 0, study.epochs * spec.budget, data_root, out))
        accelerator = build_accelerator(cfg.train.precision, cfg.train.accum_steps, use_wandb=False)
        device = accelerator.device
        model, optimizer = accelerator.prepare(*_model_and_optimizer(cfg))
        stages, _ = curriculum_stages(cfg)
        sizes = tuple(sorted({s.size for s in stages}))  # the engine's TrainStep gets the same sizes
        step = TrainStep(accelerator, model, optimizer, cfg.model.mask_ratio, cfg.curriculum.mode, cfg.optim.clip_grad,
                         compile_mode=cfg.train.compile, sizes=sizes)
        n, crop = cfg.train.batch_size, cfg.data.crop_size
        images = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, device=device)  # (n, 3, S, S)
        for size in sizes:
            t0 = time.perf_counter()
            step(images, size, mask_noise(0, 0, 0, 0, (n, (size // cfg.model.patch_size) ** 2), device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            print(f"compiled {run} B={size} in {time.perf_counter() - t0:.1f}s", flush=True)
    AcceleratorState._reset_state(True)


def _model_and_optimizer(cfg):
    model = build_model(cfg)
    return model, build_adamw(model, 0.0, cfg.optim.weight_decay, cfg.optim.betas)  # lr 0: the step is throwaway


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def split_features(model, loader, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One encoder pass over a split: {"cls": (N, D), "mean": (N, D)} float32 CPU, labels (N,)."""
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}
    labels = []
    for images, batch_labels in loader:
        if images.shape[0] == 0:  # every file of the batch was unreadable
            continue
        tokens = model.forward_features(images.to(device))  # (B, 1+L, D), unmasked
        for pool in feats:
            feats[pool].append(pool_tokens(model, tokens, pool).float().cpu())  # (B, D)
        labels.append(batch_labels)
    return {p: torch.cat(f) for p, f in feats.items()}, torch.cat(labels)


def evaluate_encoder(study: Study, run_dir: Path, data_root: Path, img_size: int, seed: int, out: Path,
                     log_path: Path) -> dict[str, float]:
    """kNN (cls, mean), the cached-feature linear probe and the short fine-tune of one pretrained encoder."""
    ev, knn, probe = study.eval, study.eval["knn"], study.eval["linprobe"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = int(ev["num_workers"])

    # one pass of centre crops per split serves the kNN and the probe (the features linprobe.mode=cached uses)
    model, _ = load_pretrained_vit(run_dir)
    model.to(device)
    train = build_eval_loader(data_root / "train", img_size, int(knn["batch_size"]), workers)
    classes = train.dataset.classes
    val = build_eval_loader(data_root / "val", img_size, int(knn["batch_size"]), workers, classes=classes)
    train_x, train_y = split_features(model, train, device)
    val_x, val_y = split_features(model, val, device)
    del model
    result = {f"knn_top1_{pool}": knn_accuracy(train_x[pool], train_y, val_x[pool], val_y, len(classes),
                                               k=int(knn["k"]), temperature=float(knn["temperature"]))
              for pool in ("cls", "mean")}

    AcceleratorState._reset_state(True)
    history = fit_probe_on_features(
        train_x["cls"], train_y, val_x["cls"], val_y, len(classes), epochs=int(probe["epochs"]),
        global_batch=int(probe["batch_size"]), blr=float(probe["blr"]), warmup_epochs=float(probe["warmup_epochs"]),
        min_lr=float(probe.get("min_lr", 0.0)), weight_decay=float(probe.get("weight_decay", 0.0)),
        momentum=float(probe.get("momentum", 0.9)), seed=seed)
    result["linear_top1"] = history[-1]["top1"]

    AcceleratorState._reset_state(True)
    name = f"{run_dir.name}_finetune"
    shutil.rmtree(out / "eval" / name, ignore_errors=True)  # a fresh fine-tune, never a resumed one
    cfg = load_finetune_config(study.finetune_recipe, [
        *study.finetune_overrides, f"model.checkpoint={json.dumps(str(run_dir))}", f"data.root={json.dumps(str(data_root))}",
        f"data.img_size={img_size}", f"data.num_workers={workers}", f"output_dir={json.dumps(str(out / 'eval'))}",
        f"name={name}", f"train.seed={seed}", 'tracking.wandb="off"', "checkpoint.resume=false",
        f"checkpoint.every_steps={NEVER}",
    ])
    with open(log_path, "w") as log, redirect_stdout(log):
        ft = finetune(cfg)
    AcceleratorState._reset_state(True)
    result["finetune_top1"] = ft.last_eval["top1"]  # the last epoch: no selection on the validation split
    result["finetune_best_top1"] = ft.best["top1"]
    return result


# ----------------------------------------------------------------------------- summary, verdicts, report


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and spread over seeds: half-range ((max - min) / 2) and the sample std."""
    return {"mean": statistics.fmean(values), "half_range": (max(values) - min(values)) / 2,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": list(values)}


def summarise(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed, key=int)
    return {key: spread([per_seed[s][key] for s in seeds]) for key in SUMMARY_KEYS}


def reference_check(study: Study, cfg, device_name: str, baseline_s_per_epoch: float) -> dict[str, Any]:
    """Our baseline's s/epoch vs the reference's; 'n/a' unless model, decoder, batch, crop and device all match."""
    ref = study.reference
    ours = {"model": cfg.model.size, "patch_size": cfg.model.patch_size, "decoder_embed_dim": cfg.model.decoder_embed_dim,
            "decoder_depth": cfg.model.decoder_depth, "batch_size": cfg.train.batch_size * cfg.train.accum_steps,
            "crop_size": cfg.data.crop_size}
    differs = [f"{k} {ours[k]} vs {ref[k]}" for k in ours if ours[k] != ref[k]]
    if ref["device"] not in device_name:
        differs.append(f"device {device_name} vs {ref['device']}")
    out = {"ours_s_per_epoch": baseline_s_per_epoch, "reference_s_per_epoch": ref["s_per_epoch"], "differs": differs}
    if differs:
        return {**out, "verdict": "n/a", "ratio": None}
    ratio = baseline_s_per_epoch / ref["s_per_epoch"]
    return {**out, "verdict": "PASS" if ratio <= 1.0 else "FAIL", "ratio": ratio}


def verdicts(study: Study, summary: dict[str, dict], speedups: dict[str, float], reference: dict) -> dict[str, Any]:
    t, base = study.targets, summary["baseline"]

    def accuracy(run: str, allowed_drop: dict[str, float]) -> dict[str, Any]:
        return {k: {"run": summary[run][k]["mean"], "baseline": base[k]["mean"], "allowed_drop": allowed_drop[k],
                    "ok": summary[run][k]["mean"] >= base[k]["mean"] - allowed_drop[k]} for k in ACCURACY_KEYS}

    # et: within the baseline's seed range (mean - half-range) or above; etpp_half: within a fixed number of points
    et_acc = accuracy("et", {k: base[k]["half_range"] for k in ACCURACY_KEYS})
    etpp_acc = accuracy("etpp_half", {k: float(t["etpp_max_drop"]) for k in ACCURACY_KEYS})
    et_lin, eq_lin = summary["et"]["linear_top1"]["mean"], summary["baseline_equal_time"]["linear_top1"]["mean"]
    return {
        "et": {"speedup": speedups["et"], "target_speedup": t["et_speedup"], "accuracy": et_acc,
               "pass": speedups["et"] >= t["et_speedup"] and all(a["ok"] for a in et_acc.values())},
        "etpp_half": {"speedup": speedups["etpp_half"], "target_speedup": t["etpp_speedup"], "accuracy": etpp_acc,
                      "pass": speedups["etpp_half"] >= t["etpp_speedup"] and all(a["ok"] for a in etpp_acc.values())},
        "equal_time": {"et_linear_top1": et_lin, "baseline_equal_time_linear_top1": eq_lin,
                       "wall_ratio": summary["baseline_equal_time"]["wall_s"]["mean"] / summary["et"]["wall_s"]["mean"],
                       "pass": et_lin > eq_lin},
        "reference": reference,
    }


def verdict_lines(v: dict[str, Any], study: Study) -> list[str]:
    def word(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def acc(a: dict) -> str:
        return "; ".join(f"{k} {x['run']:.2f} vs {x['baseline']:.2f} (-{x['allowed_drop']:.2f} allowed) "
                         f"{'ok' if x['ok'] else 'below'}" for k, x in a.items())

    et, pp, eq, ref = v["et"], v["etpp_half"], v["equal_time"], v["reference"]
    ref_detail = (f"ours {ref['ours_s_per_epoch']:.2f} s/epoch vs reference {ref['reference_s_per_epoch']} s/epoch"
                  + (f" ({'; '.join(ref['differs'])})" if ref["differs"] else f" (x{ref['ratio']:.2f})"))
    return [
        f"verdict et (>= {et['target_speedup']}x less wall time, accuracy within the baseline's seed range or above): "
        f"{word(et['pass'])} - speed-up {et['speedup']:.2f}x; {acc(et['accuracy'])}",
        f"verdict etpp_half (>= {pp['target_speedup']}x less wall time, accuracy within {study.targets['etpp_max_drop']} point): "
        f"{word(pp['pass'])} - speed-up {pp['speedup']:.2f}x; {acc(pp['accuracy'])}",
        f"verdict equal wall time (curriculum ahead on linear probe): {word(eq['pass'])} - et {eq['et_linear_top1']:.2f} vs "
        f"baseline_equal_time {eq['baseline_equal_time_linear_top1']:.2f} (its wall time {eq['wall_ratio']:.2f}x et's)",
        f"verdict baseline s/epoch vs reference: {ref['verdict']} - {ref_detail}",
    ]


def markdown_table(summary: dict[str, dict], speedups: dict[str, float], seeds: list[int]) -> str:
    def cell(stat: dict, digits: int) -> str:
        return f"{stat['mean']:.{digits}f} ± {stat['half_range']:.{digits}f}"

    lines = [f"mean ± half-range over seeds {', '.join(map(str, seeds))}; speed-up = baseline wall time / run wall time",
             "",
             "| run | epochs | steps | wall s | speed-up | process s | img/s | final loss | kNN cls | kNN mean | linear | fine-tune |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in RUNS:
        s = summary[run]
        lines.append(f"| {run} | {cell(s['epochs'], 2)} | {cell(s['steps'], 0)} | {cell(s['wall_s'], 2)} | {speedups[run]:.2f}x | "
                     f"{cell(s['process_s'], 1)} | {cell(s['images_per_sec'], 0)} | {cell(s['final_loss'], 4)} | "
                     f"{cell(s['knn_top1_cls'], 2)} | {cell(s['knn_top1_mean'], 2)} | {cell(s['linear_top1'], 2)} | "
                     f"{cell(s['finetune_top1'], 2)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(axes, ("knn_top1_cls", "linear_top1"), ("kNN top-1, cls, k=20", "linear probe top-1")):
        for i, run in enumerate(RUNS):
            color = f"C{i}"
            seeds = results[run]
            ax.scatter([seeds[s]["wall_s"] for s in seeds], [seeds[s][key] for s in seeds], color=color, alpha=0.35, s=18)
            w, a = summary[run]["wall_s"], summary[run][key]
            ax.errorbar(w["mean"], a["mean"], xerr=w["half_range"], yerr=a["half_range"], fmt="o", color=color,
                        capsize=3, label=run)
        ax.set_xlabel("pretraining wall time (s)")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy vs pretraining wall time (seeds: light dots; mean ± half-range)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def save_partial(out: Path, results: dict, equal_time: dict) -> None:
    """The numbers so far, after every run and evaluation: what a study cut off by a time limit leaves."""
    (out / "results_partial.json").write_text(json.dumps({"runs": results, "equal_time": equal_time}, indent=2))


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="configs/study/<name>.yaml")
    parser.add_argument("--data", default=None, help="ImageFolder root with train/ and val/ (default: the study's data_root)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/study/<study name>/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="train.seed of each repetition (default: the study's)")
    parser.add_argument("--launch", choices=("auto", "subprocess", "inprocess"), default="auto",
                        help="pretraining runs as `python pretrain.py` subprocesses or in this process "
                             "(auto: subprocess with a GPU, in-process without)")
    parser.add_argument("--warm-compile", action="store_true", help=argparse.SUPPRESS)  # the warm-up's own process
    args = parser.parse_args(argv)

    study = load_study(args.study)
    data_root = Path(args.data) if args.data else study.data_root
    if data_root is None or not (data_root / "train").is_dir() or not (data_root / "val").is_dir():
        raise StudyError(f"data root '{data_root}' needs train/ and val/ class folders; pass --data /path/to/imagenette")
    data_root = data_root.resolve()
    out = Path(args.out).resolve() if args.out else REPO / "runs" / "study" / study.name
    if args.warm_compile:
        warm_compile(study, data_root, out)
        return {}
    seeds = args.seeds if args.seeds is not None else study.seeds
    launch = args.launch if args.launch != "auto" else ("subprocess" if torch.cuda.is_available() else "inprocess")
    for sub in ("runs", "eval", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # a study-local inductor cache: filled by the warm-up below, shared by every run of this study
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")}

    # every config checked before anything runs (the equal-time run's epochs are known only later)
    cfgs = {run: load_pretrain_config(study.recipe, pretrain_overrides(
        study, run, 0, study.epochs * (1.0 if spec.budget == EQUAL_TIME else spec.budget), data_root, out))
        for run, spec in study.runs.items()}
    base_cfg = cfgs["baseline"]
    num_images = len(scan_image_folder(data_root / "train").samples)
    planned_spe = num_images // (base_cfg.train.batch_size * base_cfg.train.accum_steps)
    rate = study.peak_tflops * study.assumed_mfu * 1e12
    print(f"study {study.name}: {base_cfg.model.size}/{base_cfg.model.patch_size} (decoder {base_cfg.model.decoder_embed_dim} x "
          f"{base_cfg.model.decoder_depth}) at {base_cfg.data.crop_size} px, E = {study.epochs:g}, batch "
          f"{base_cfg.train.batch_size * base_cfg.train.accum_steps}, {base_cfg.train.precision}, compile {base_cfg.train.compile}, "
          f"{num_images} training images, seeds {seeds}, launch {launch}; out {out}")
    for run in RUNS[:3]:
        stages = planned_stages(cfgs[run], planned_spe)
        flops = train_flops(cfgs[run], stages)
        print(f"  plan {run}: {sum(n for _, n in stages)} steps at B {'/'.join(str(b) for b, _ in stages)}, {flops / 1e15:.3g} PFLOP "
              f"(~{flops / rate:.0f} s at {100 * study.assumed_mfu:.0f}% of {study.peak_tflops:g} TFLOP/s)")

    warmup_s = None
    # in-process, the first run would also pay this process's one-time costs (lazy kernels, allocator,
    # thread pools): the throwaway steps take them for every run, compiled or not
    if base_cfg.train.compile != "none" or launch == "inprocess":
        t0 = time.perf_counter()
        if launch == "subprocess":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--study", str(study.path), "--data", str(data_root),
                   "--out", str(out), "--warm-compile"]
            with open(out / "logs" / "compile_warmup.log", "w") as log:
                if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                    raise StudyError(f"the compile warm-up failed; see {out / 'logs' / 'compile_warmup.log'}")
        else:
            warm_compile(study, data_root, out)
        warmup_s = time.perf_counter() - t0
        print(f"warm-up (compile and first-use costs): {warmup_s:.0f}s (not part of any run)")

    # --- pretraining: per seed baseline, et, etpp_half, then the baseline with et's wall time
    results: dict[str, dict[str, dict]] = {run: {} for run in RUNS}
    commands: dict[str, list[str]] = {}
    equal_time: dict[str, dict] = {}
    for seed in seeds:
        for run in RUNS:
            spec = study.runs[run]
            if spec.budget == EQUAL_TIME:
                et, base = results["et"][str(seed)], results["baseline"][str(seed)]
                epochs, steps = equal_time_budget(study.epochs, et["wall_s"], base["wall_s"], base["steps_per_epoch"])
                equal_time[str(seed)] = {"et_wall_s": et["wall_s"], "baseline_wall_s": base["wall_s"],
                                         "ratio": et["wall_s"] / base["wall_s"], "steps_per_epoch": base["steps_per_epoch"],
                                         "epochs": epochs, "steps": steps}
            else:
                epochs = study.epochs * spec.budget
            overrides = pretrain_overrides(study, run, seed, epochs, data_root, out)
            cfg = load_pretrain_config(study.recipe, overrides)
            shutil.rmtree(cfg.run_dir, ignore_errors=True)  # every number comes from this invocation's run
            commands[run_name(run, seed)] = pretrain_command(study.recipe, overrides)
            log = out / "logs" / f"{run_name(run, seed)}.pretrain.log"
            process_s = launch_pretrain(study.recipe, overrides, log, launch, env)
            r = results[run][str(seed)] = {"seed": seed, **read_pretrain_run(cfg.run_dir, cfg, process_s)}
            save_partial(out, results, equal_time)
            print(f"pretrained {run} seed {seed}: {r['epochs']:.4g} epochs, {r['steps']} steps, {r['wall_s']:.1f}s training "
                  f"({r['process_s']:.1f}s launch), {r['images_per_sec']:.0f} img/s, final loss {r['final_loss']:.4f}")
            print("  per stage: " + ", ".join(f"B {st['size']}: {st['steps']} steps in {st['seconds']:.1f}s "
                                              f"({st['steady_images_per_sec']:.0f} img/s steady)" for st in r["stages"]), flush=True)

    # --- evaluation of every encoder, the same way
    for seed in seeds:
        for run in RUNS:
            r = results[run][str(seed)]
            r.update(evaluate_encoder(study, Path(r["run_dir"]), data_root, base_cfg.data.crop_size, seed, out,
                                      out / "logs" / f"{run_name(run, seed)}.finetune.log"))
            save_partial(out, results, equal_time)
            print(f"evaluated {run} seed {seed}: kNN cls {r['knn_top1_cls']:.2f} mean {r['knn_top1_mean']:.2f}, "
                  f"linear {r['linear_top1']:.2f}, fine-tune {r['finetune_top1']:.2f}", flush=True)

    # --- summary
    summary = {run: summarise(results[run]) for run in RUNS}
    base_wall = summary["baseline"]["wall_s"]["mean"]
    speedups = {run: base_wall / summary[run]["wall_s"]["mean"] for run in RUNS}
    steady_speedups = {run: summary["baseline"]["steady_s"]["mean"] / summary[run]["steady_s"]["mean"] for run in RUNS}
    device = device_name()
    reference = reference_check(study, base_cfg, device, summary["baseline"]["s_per_epoch"]["mean"])
    v = verdicts(study, summary, speedups, reference)
    table = markdown_table(summary, speedups, seeds)
    lines = verdict_lines(v, study)
    result = {
        "study": study.name, "study_config": str(study.path), "settings": study.raw, "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "launch": launch, "data_root": str(data_root), "num_train_images": num_images, "seeds": seeds,
        "compile_warmup_s": warmup_s, "runs": results, "summary": summary, "speedups": speedups,
        "steady_speedups": steady_speedups, "equal_time": equal_time, "verdicts": v, "commands": commands,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    verdict_list = "\n".join(f"- {line}" for line in lines)
    (out / "table.md").write_text(f"# {study.name} ({device}, {result['date']})\n\n{table}\n{verdict_list}\n")
    plot(results, summary, out / "accuracy_vs_wall_time.png", study.name)

    print()
    print(table)
    print("speed-ups (baseline wall time / run wall time): " + ", ".join(f"{run} {speedups[run]:.2f}x" for run in RUNS))
    print("steady-state speed-ups (each stage at its median rate, without its first logged window): "
          + ", ".join(f"{run} {steady_speedups[run]:.2f}x" for run in RUNS))
    for line in lines:
        print(line)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'accuracy_vs_wall_time.png'}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (StudyError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
