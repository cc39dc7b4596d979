"""Evaluating one encoder the study's way: centre-crop features, weighted kNN (at the training size and at the test
sizes of eval.knn.sizes), the linear probe on cached features and the short fine-tune, each stage timed; and
--recheck, which evaluates finished encoders again beside their stored numbers."""

from __future__ import annotations

import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

from benchmarks.study.clocks import Stopwatch, code_version, machine
from benchmarks.study.config import ACCURACY_KEYS, Study, StudyError, run_name
from benchmarks.study.paths import in_repo
from benchmarks.study.runs import clear_if_config_changed
from benchmarks.study.state import StudyState
from mae_et.data.labelled import build_eval_loader
from mae_et.evaluate.config import load_finetune_config
from mae_et.evaluate.finetune import finetune
from mae_et.evaluate.linprobe import fit_probe_on_features
from mae_et.models.features import extract_pools, knn_accuracy
from mae_et.models.mae import get_2d_sincos_pos_embed
from mae_et.models.vit import load_pretrained_vit
from mae_et.run.run import fresh_accelerate_state

POOLS = ("cls", "mean")


def encoder_at_size(run_dir: Path, test_size: int | None = None, pos_embed: str = "grid"):
    """The encoder as a timm ViT for inputs of test_size (None: its training size), with the positions its MAE's
    `model.pos_embed` mode gives a grid of g = test_size / p patches: grid 0..g-1 (the reference), or extent (g
    positions spread over its training grid G, fractional). At the training size both are the stored table."""
    model, spec = load_pretrained_vit(run_dir, img_size=test_size)
    if test_size is not None and test_size != spec.img_size:
        g, full = test_size // spec.patch_size, spec.img_size // spec.patch_size
        table = get_2d_sincos_pos_embed(
            model.embed_dim, g, cls_token=True, extent=full if pos_embed == "extent" else None
        )
        with torch.no_grad():
            model.pos_embed.copy_(table.unsqueeze(0))  # (1, 1+g*g, D): replaces timm's bicubic resampling
    return model


def encoder_features(
    run_dir: Path,
    data_root: Path,
    img_size: int,
    batch_size: int,
    workers: int,
    device,
    splits: tuple[str, ...] = ("train", "val"),
    test_size: int | None = None,
    pos_embed: str = "grid",
) -> tuple[dict, list[str]]:
    """Centre-crop features of each split of `data_root` (what the kNN and the cached probe use), at img_size, by the
    encoder built for test_size (`encoder_at_size`; None: its training size):
    ({split: ({"cls": (N, D), "mean": (N, D)}, labels (N,))}, class names)."""
    model = encoder_at_size(run_dir, test_size, pos_embed)
    model.to(device)
    classes, features = None, {}
    for split in splits:
        loader = build_eval_loader(data_root / split, img_size, batch_size, workers, classes=classes)
        classes = loader.dataset.classes
        features[split] = extract_pools(model, loader, device, POOLS)  # ({pool: (N, D)}, labels (N,))
    return features, classes


def knn_top1(features: dict, num_classes: int, knn: dict[str, Any]) -> dict[str, float]:
    """{pool: weighted kNN top-1 of the val features against the train bank}, with the study's k and temperature."""
    (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
    return {
        pool: knn_accuracy(
            train_x[pool],
            train_y,
            val_x[pool],
            val_y,
            num_classes,
            k=int(knn["k"]),
            temperature=float(knn["temperature"]),
        )
        for pool in POOLS
    }


def probe_settings(probe: dict[str, Any]) -> dict[str, Any]:
    """The study's linprobe section as fit_probe_on_features arguments."""
    return dict(
        epochs=int(probe["epochs"]),
        global_batch=int(probe["batch_size"]),
        blr=float(probe["blr"]),
        warmup_epochs=float(probe["warmup_epochs"]),
        min_lr=float(probe.get("min_lr", 0.0)),
        weight_decay=float(probe.get("weight_decay", 0.0)),
        momentum=float(probe.get("momentum", 0.9)),
    )


def run_finetune(
    study: Study,
    run_dir: Path,
    data_root: Path,
    img_size: int,
    seed: int,
    out: Path,
    log_path: Path,
    extra: list[str] = (),
) -> dict[str, float]:
    """The study's fine-tune of one encoder; resumes a half-finished one of the same config."""
    name = f"{run_dir.name}_finetune"
    cfg = load_finetune_config(
        study.finetune_recipe,
        [
            *study.finetune_overrides,
            f"model.checkpoint={json.dumps(str(run_dir))}",
            f"data.root={json.dumps(str(data_root))}",
            f"data.img_size={img_size}",
            f"data.num_workers={int(study.eval['num_workers'])}",
            f"output_dir={json.dumps(str(out / 'eval'))}",
            f"name={name}",
            f"train.seed={seed}",
            'tracking.wandb="off"',
            "checkpoint.resume=true",
            "checkpoint.every_epochs=1",
            "checkpoint.keep_last=1",
            *extra,
        ],
    )
    clear_if_config_changed(cfg.run_dir, cfg)
    fresh_accelerate_state()
    with open(log_path, "a") as log, redirect_stdout(log):
        ft = finetune(cfg)
    fresh_accelerate_state()
    # the last epoch: no selection on the validation split
    return {"finetune_top1": ft.last_eval["top1"], "finetune_best_top1": ft.best["top1"]}


def knn_at_sizes(
    study: Study, run_dir: Path, data_root: Path, img_size: int, main: dict[str, float], num_classes: int, **where
) -> dict[str, float]:
    """kNN top-1 at each test size of eval.knn.sizes (`knn_top1_<pool>_at<size>`): train bank and queries at that
    size, positions as the encoder's pos_embed mode gives them (`where`: device, pos_embed); at the training size,
    the main kNN's."""
    ev, knn = study.eval, study.eval["knn"]
    result = {}
    for size in [int(b) for b in knn.get("sizes") or []]:
        if size == img_size:
            at = {pool: main[f"knn_top1_{pool}"] for pool in POOLS}
        else:
            feats, _ = encoder_features(
                run_dir, data_root, size, int(knn["batch_size"]), int(ev["num_workers"]), test_size=size, **where
            )
            at = knn_top1(feats, num_classes, knn)
        for pool, acc in at.items():
            result[f"knn_top1_{pool}_at{size}"] = acc
    return result


def evaluate_encoder(
    study: Study,
    run_dir: Path,
    data_root: Path,
    img_size: int,
    seed: int,
    out: Path,
    log_path: Path,
    pos_embed: str = "grid",
) -> dict[str, Any]:
    """kNN (cls, mean), the cached-feature linear probe and the short fine-tune of one encoder, each stage timed;
    with eval.knn.sizes, kNN at each of those test sizes too (`knn_top1_<pool>_at<size>`, train bank and queries at
    that size, positions as the encoder's pos_embed mode gives them)."""
    ev, knn = study.eval, study.eval["knn"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seconds: dict[str, dict[str, float]] = {}

    # one pass of centre crops per split serves the kNN and the probe (the features linprobe.mode=cached uses)
    with Stopwatch() as sw:
        features, classes = encoder_features(
            run_dir, data_root, img_size, int(knn["batch_size"]), int(ev["num_workers"]), device
        )
        result: dict[str, Any] = {
            f"knn_top1_{pool}": acc for pool, acc in knn_top1(features, len(classes), knn).items()
        }
    seconds["features_knn"] = sw.as_dict()

    if knn.get("sizes"):
        with Stopwatch() as sw:
            result.update(
                knn_at_sizes(
                    study, run_dir, data_root, img_size, result, len(classes), device=device, pos_embed=pos_embed
                )
            )
        seconds["knn_sizes"] = sw.as_dict()

    (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
    with Stopwatch() as sw:
        fresh_accelerate_state()
        history = fit_probe_on_features(
            train_x["cls"], train_y, val_x["cls"], val_y, len(classes), seed=seed, **probe_settings(ev["linprobe"])
        )
        result["linear_top1"] = history[-1]["top1"]
    seconds["linear_probe"] = sw.as_dict()

    with Stopwatch() as sw:
        result.update(run_finetune(study, run_dir, data_root, img_size, seed, out, log_path))
    seconds["finetune"] = sw.as_dict()
    return {**result, "eval_seconds": seconds}


def recheck(study: Study, state: StudyState, items: list[str], data_root: Path, img_size: int, out: Path) -> dict:
    """Evaluate finished encoders ('<row>:<seed>') again, into <out>/recheck/, each number beside the stored one:
    whether a stored evaluation reproduces with this code on this machine (e.g. before comparing rows evaluated by
    different commits). Nothing in state.json changes."""
    report = {}
    for item in items:
        row, _, seed = item.rpartition(":")
        entry = state.data["runs"].get(row, {}).get(seed, {})
        if not row or "pretrain" not in entry or "eval" not in entry:
            raise StudyError(
                f"--recheck {item}: no evaluated run '{row}' seed '{seed}' in {state.path}; give "
                f"<row>:<seed> of one, e.g. baseline:0"
            )
        run_dir = in_repo(entry["pretrain"]["value"]["run_dir"])
        if not (run_dir / "checkpoints").is_dir():
            raise StudyError(
                f"--recheck {item}: its run folder {run_dir} is gone, so its encoder cannot be evaluated again"
            )
        stored = entry["eval"]["value"]
        name = run_name(row, int(seed))
        new = evaluate_encoder(
            study, run_dir, data_root, img_size, int(seed), out / "recheck", out / "logs" / f"{name}.recheck.log"
        )
        report[name] = {
            "code": code_version(),
            "machine": machine(),
            "stored": stored,
            "again": new,
            "difference": {k: new[k] - stored[k] for k in (*ACCURACY_KEYS, "finetune_best_top1") if k in stored},
        }
        print(
            f"recheck {name}: " + ", ".join(f"{k} {stored[k]:.2f} -> {new[k]:.2f}" for k in report[name]["difference"]),
            flush=True,
        )
    (out / "recheck").mkdir(parents=True, exist_ok=True)
    (out / "recheck" / "recheck.json").write_text(json.dumps(report, indent=2))
    return report
