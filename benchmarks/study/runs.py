"""The study's pretraining runs: every override of one run, the plan and FLOPs it will spend, launching it (in this
process or as `python pretrain.py`), reading its numbers back from its run folder, the equal-time budget, the
untrained encoder, and the compile warm-up that fills the inductor cache before any run."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

from benchmarks import REPO
from benchmarks.study.clocks import quiet_cpu_seconds, training_clock
from benchmarks.study.config import (
    BASELINE,
    EQUAL_TIME,
    NO_MONITORS,
    UNTRAINED,
    Study,
    StudyError,
    row_config,
    run_name,
    split_row,
)
from benchmarks.study.paths import repo_relative
from mae_et.checkpoint import META_FILE, list_checkpoints, save_checkpoint
from mae_et.curriculum.schedules import plan_curriculum
from mae_et.files import RunFolderLock, write_text_atomic
from mae_et.models.flops import mae_train_flops_per_image
from mae_et.models.mae import build_mae
from mae_et.recipes import config_to_dict, flatten_dict
from mae_et.run.run import build_accelerator, fresh_accelerate_state
from mae_et.run.tracking import METRICS_FILE
from mae_et.train.config import curriculum_stages, load_pretrain_config, mae_spec
from mae_et.train.pretrain import mask_noise, pretrain
from mae_et.train.step import build_training

NEVER = 10**9  # checkpoint.every_steps: no periodic checkpoint


def pretrain_overrides(study: Study, row: str, seed: int, epochs: float, data_root: Path, out: Path) -> list[str]:
    """Every override of one pretraining: the study's, the run's (then an ablation's, for a row 'run+ablation'),
    then what the study fixes for all. `untrained` takes the baseline's (its encoder is the baseline's at step 0)."""
    run, ablation = split_row(row)
    spec = study.ablations[ablation] if ablation else None
    warmup = spec.warmup_fraction if spec and spec.warmup_fraction is not None else study.warmup_fraction
    every = (
        f"checkpoint.every_epochs={study.checkpoint_every_epochs!r}"
        if study.checkpoint_every_epochs
        else f"checkpoint.every_steps={NEVER}"
    )
    return [
        *study.overrides,
        *study.runs[BASELINE if run == UNTRAINED else run].overrides,
        *(spec.overrides if spec else []),
        f"data.root={json.dumps(str(data_root))}",
        f"output_dir={json.dumps(str(out / 'runs'))}",
        f"name={run_name(row, seed)}",
        f"train.seed={seed}",
        f"train.epochs={epochs!r}",
        f"optim.warmup_epochs={warmup * epochs!r}",
        # a killed run resumes from its last checkpoint; the engine's clock leaves checkpoint writes out of the
        # training time. No grids, no kNN monitor, no W&B.
        every,
        "checkpoint.resume=true",
        "checkpoint.keep_last=1",
        *NO_MONITORS,
        'tracking.wandb="off"',
    ]


def pretrain_config(
    study: Study, row: str, seed: int, epochs: float, data_root: Path, out: Path, reads_data: bool = True
):
    """The config of one pretraining of the study (`pretrain_overrides` on its recipe); reads_data=False: only the
    model and the plan are wanted (`row_config`)."""
    overrides = pretrain_overrides(study, row, seed, epochs, data_root, out)
    return row_config(study.recipe, *overrides, reads_data=reads_data)


def pretrain_command(recipe: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "pretrain.py"), "--config", str(recipe), *overrides]


# ----------------------------------------------------------------------------- compute accounting


def planned_stages(cfg, steps_per_epoch: int) -> list[tuple[int, int]]:
    """[(B, steps)] of a run, as the engine lays it out."""
    stages, budget = curriculum_stages(cfg)
    plan = plan_curriculum(stages, budget, cfg.train.epochs, steps_per_epoch, cfg.data.crop_size)
    return [(s.size, s.num_steps) for s in plan.stages]


def train_flops(cfg, stages: list[tuple[int, int]]) -> float:
    batch = cfg.train.batch_size * cfg.train.accum_steps
    return sum(steps * batch * image_flops(cfg, size) for size, steps in stages)


def image_flops(
    cfg,
    size: int,
    decode_fraction: float | None = None,
    target: str | None = None,
    decode_fraction_of: str | None = None,
) -> float:
    """Training FLOPs per image at input size B, with the decoder tokens the run really decodes
    (model.decode_fraction of the patches model.decode_fraction_of names) and its target; decode_fraction / target /
    decode_fraction_of: another share, target or rule on the same model."""
    m = cfg.model
    of = m.decode_fraction_of if decode_fraction_of is None else decode_fraction_of
    return mae_train_flops_per_image(
        m.size,
        size,
        m.patch_size,
        m.decoder_embed_dim,
        m.decoder_depth,
        m.mask_ratio,
        decode_fraction=m.decode_fraction if decode_fraction is None else decode_fraction,
        target=m.target if target is None else target,
        hog_cell_size=m.hog_cell_size,
        hog_bins=m.hog_bins,
        decode_of_size=cfg.data.crop_size if of == "full_size" else None,
    )


# ----------------------------------------------------------------------------- pretraining


def run_folder_lock(run_dir: Path) -> RunFolderLock:
    """The run folder's own lock (the one `pretrain`/`finetune` hold), for the study's writes into a run folder."""
    return RunFolderLock(
        run_dir, ways_on="another study process is using it; wait for it to end, or give this study another --out"
    )


def clear_if_config_changed(run_dir: Path, cfg) -> Path | None:
    """A run folder left by a different config (an edited study, or the same data under another path) starts over
    instead of resuming; the old folder is moved aside, not deleted (it may hold a finished run's only
    checkpoint), and the keys that differ are named. Returns where it went."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    now = flatten_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False)))
    before = flatten_dict(yaml.safe_load(saved.read_text()) or {})
    differ = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if not differ:
        return None
    aside = next(
        run_dir.with_name(f"{run_dir.name}.old-{n}")
        for n in range(1, 10_000)
        if not run_dir.with_name(f"{run_dir.name}.old-{n}").exists()
    )
    with run_folder_lock(run_dir):  # never move a folder a live run is writing
        run_dir.rename(aside)
    print(
        f"  {run_dir.name}: its saved config differs from this study's in "
        + ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in differ[:4])
        + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        + f"; starting it over (the old folder is kept as {aside.name})",
        flush=True,
    )
    return aside


def launch_pretrain(cfg_recipe: Path, overrides: list[str], log_path: Path, launch: str, env: dict) -> float:
    """One pretraining run, to its end (resuming when its folder has a checkpoint); returns the launch's wall
    time (s)."""
    t0 = time.perf_counter()
    if launch == "subprocess":
        with open(log_path, "a") as log:
            proc = subprocess.run(
                pretrain_command(cfg_recipe, overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-20:])
            raise StudyError(f"pretraining failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    else:
        fresh_accelerate_state()
        with open(log_path, "a") as log, redirect_stdout(log):
            pretrain(load_pretrain_config(cfg_recipe, overrides))
    return time.perf_counter() - t0


def stage_times(records: list[dict[str, Any]], global_batch: int) -> list[dict[str, Any]]:
    """Time per curriculum stage, on both clocks, sorted by size: each logged window (train.log_every steps) counts
    for the stage of its last step, so a window that straddles a stage change (at most log_every steps) goes to the
    later stage."""
    per_size: dict[int, dict[str, Any]] = {}
    prev_step, prev_wall, prev_cpu = 0, 0.0, 0.0
    for r in records:
        wall, cpu = training_clock(r)
        s = per_size.setdefault(
            r["size"], {"size": r["size"], "steps": 0, "seconds": 0.0, "cpu_seconds": 0.0, "windows": []}
        )
        s["steps"] += r["step"] - prev_step
        s["seconds"] += wall - prev_wall
        s["cpu_seconds"] += cpu - prev_cpu
        s["windows"].append(r["images_per_sec"])
        prev_step, prev_wall, prev_cpu = r["step"], wall, cpu
    for s in per_size.values():
        windows = s.pop("windows")
        s["images_per_sec"] = s["steps"] * global_batch / s["seconds"]
        s["images_per_cpu_sec"] = s["steps"] * global_batch / s["cpu_seconds"]
        # a stage's first window holds its one-time start (tracing the graph of a new size, first allocations):
        # the median of the others is the stage's steady rate, for a wall time without those starts
        s["steady_images_per_sec"] = statistics.median(windows[1:] or windows)
    return sorted(per_size.values(), key=lambda s: s["size"])


def final_checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    """meta.json of a run folder's latest complete checkpoint ({} when it has none)."""
    ckpts = list_checkpoints(run_dir / "checkpoints")
    return json.loads((ckpts[-1] / META_FILE).read_text()) if ckpts else {}


def holds_finished_encoder(run_dir: Path, steps: int) -> bool:
    """Whether a finished run's folder still holds its encoder: a complete checkpoint at the run's last step. A state
    carried to a new machine names folders that are gone, or that a relaunched retraining has just made again (only
    config.yaml and metrics.jsonl, then checkpoints of earlier steps): neither can be evaluated."""
    meta = final_checkpoint_meta(run_dir)
    return bool(meta.get("complete")) and meta.get("step") == steps


def read_pretrain_run(run_dir: Path, cfg, process_s: float) -> dict[str, Any]:
    """The numbers of a finished run, from its metrics.jsonl and final checkpoint."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    meta = final_checkpoint_meta(run_dir)
    if not meta.get("complete"):
        raise StudyError(f"run {run_dir} did not finish (no complete final checkpoint)")
    steps, global_batch = meta["step"], meta["global_batch"]
    steps_per_epoch = round(steps / meta["epoch"])  # meta epoch = steps / steps_per_epoch
    stages = stage_times(records, global_batch)
    wall, cpu = training_clock(records[-1])
    epochs_seen = steps / steps_per_epoch  # epochs of images (a compute budget runs more than its E)
    plan = planned_stages(cfg, steps_per_epoch)
    if sum(n for _, n in plan) != steps:
        raise StudyError(f"run {run_dir}: {steps} steps done, the plan has {sum(n for _, n in plan)}")
    flops = train_flops(cfg, plan)
    return {
        "run_dir": repo_relative(run_dir),
        "schedule": cfg.curriculum.schedule,
        "epochs": cfg.train.epochs,
        "decode_fraction": cfg.model.decode_fraction,
        "decode_fraction_of": cfg.model.decode_fraction_of,
        "pos_embed": cfg.model.pos_embed,
        "target": cfg.model.target,
        "steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "global_batch": global_batch,
        "epochs_of_images": epochs_seen,
        "wall_s": wall,
        "cpu_s": cpu,
        "process_s": process_s,
        "s_per_epoch": wall / epochs_seen,
        "images_per_sec": steps * global_batch / wall,
        "steady_s": sum(s["steps"] * global_batch / s["steady_images_per_sec"] for s in stages),
        "quiet_cpu_s": quiet_cpu_seconds(records),
        "stages": stages,
        "final_loss": records[-1]["loss"],
        "pflop": flops / 1e15,
        "achieved_tflops": flops / wall / 1e12,
    }


def equal_time_budget(epochs: float, et_time: float, baseline_time: float, steps_per_epoch: int) -> tuple[float, int]:
    """E' = E * time(et) / time(baseline), rounded to a whole step (half up, as the curriculum planner)."""
    steps = max(1, math.floor(epochs * et_time / baseline_time * steps_per_epoch + 0.5))
    return steps / steps_per_epoch, steps


def save_untrained_encoder(study: Study, seed: int, data_root: Path, out: Path) -> Path:
    """The E = 0 row: the baseline's initial weights (the engine seeds the same way before building the model),
    saved as a finished run folder, so every evaluation reads it like any pretrained encoder."""
    cfg = pretrain_config(study, UNTRAINED, seed, study.epochs, data_root, out)
    set_seed(seed, deterministic=cfg.train.deterministic)
    model = build_mae(mae_spec(cfg))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    with run_folder_lock(cfg.run_dir):  # a run folder like any other: one writer
        write_text_atomic(cfg.run_dir / "config.yaml", config_yaml)
        save_checkpoint(
            cfg.run_dir / "checkpoints",
            0,
            model.state_dict(),
            {"step": 0},
            config_yaml,
            {"step": 0, "total_steps": 0, "epoch": 0.0, "complete": True, "untrained": True},
            keep_last=1,
        )
    return cfg.run_dir


# ----------------------------------------------------------------------------- the compile warm-up


def warm_compile(study: Study, data_root: Path, out: Path) -> None:
    """One throwaway step per curriculum size of every run, compiled exactly as the runs will compile it:
    fills the inductor cache, so that no run pays a compile that another run would have found cached."""
    for run, spec in study.runs.items():
        if spec.budget == EQUAL_TIME:
            continue  # the baseline's graph
        fresh_accelerate_state()
        cfg = pretrain_config(study, run, 0, study.epochs * spec.budget, data_root, out)
        warm_run(run, cfg)
    fresh_accelerate_state()


def warm_run(run: str, cfg) -> None:
    """The throwaway steps of one run: its model, optimizer and TrainStep as the engine builds them, one step at
    each of its curriculum sizes."""
    accelerator = build_accelerator(cfg.train.precision, cfg.train.accum_steps, use_wandb=False)
    device = accelerator.device
    stages, _ = curriculum_stages(cfg)
    sizes = tuple(sorted({s.size for s in stages}))  # the engine's TrainStep gets the same sizes
    _, _, step = build_training(cfg, accelerator, 0.0, sizes)  # lr 0: the step is throwaway
    n, crop = cfg.train.batch_size, cfg.data.crop_size
    images = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, device=device)  # (n, 3, S, S)
    for size in sizes:
        t0 = time.perf_counter()
        step(images, size, mask_noise(0, 0, 0, 0, (n, (size // cfg.model.patch_size) ** 2), device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"compiled {run} B={size} in {time.perf_counter() - t0:.1f}s", flush=True)
