"""Settle a study's evaluation protocols on its baseline encoder, scored on a held-out slice of train (never val).

    python benchmarks/settle_eval_protocol.py --study configs/study/<name>.yaml --encoders RUN_DIR [untrained] \
        [--probe-blr 0.1 1 10] [--probe-epochs 90 300] [--probe-batch 256 1024] \
        [--finetune-blr 1e-3 3e-3] [--finetune-epochs 2] [--out DIR]

The study's training split is cut into a stratified, seeded hold-out (`--holdout`, 10% of each class by
default) and the rest; the grid trains on the rest and is scored on the hold-out, so the choice never sees
the validation split the study reports. Two questions each protocol must answer on this data:
- the linear probe (BatchNorm + Linear on cached cls features, LARS): a grid of base lr x epochs x batch, with
  the kNN of the same features on the same hold-out beside it (a probe that scores below kNN is undertrained);
- the fine-tune (the study's recipe): each base lr x epochs on each encoder; `untrained` names the untrained
  encoder (the baseline's initial weights for --seed), which the pretrained one must clearly beat.
Writes settle.json and settle.md under --out (default runs/study/<study name>/settle/); the choice and its
evidence go into the study config by hand, with this command beside them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/settle_eval_protocol.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks.study.clocks import Stopwatch, device_name
from benchmarks.study.config import load_study
from benchmarks.study.evaluation import encoder_features, knn_top1, probe_settings, run_finetune
from benchmarks.study.paths import default_out
from benchmarks.study.runs import pretrain_config, save_untrained_encoder
from mae_et.cli import OneLineParser, run_user_command
from mae_et.data.folder import scan_image_folder
from mae_et.evaluate.linprobe import fit_probe_on_features
from mae_et.run.run import fresh_accelerate_state


def make_holdout(train_dir: Path, fraction: float, seed: int, out: Path) -> Path:
    """out/{train,val}/<class>/ of symlinks: a seeded `fraction` of each class of `train_dir` as val, the rest as
    train. Rebuilt each time (cheap), so it always matches the arguments."""
    index = scan_image_folder(train_dir)
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for path, label in index.samples:
        by_class.setdefault(label, []).append(path)
    for split in ("train", "val"):
        for cls in index.classes:
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
    for label, paths in by_class.items():
        paths = sorted(paths)
        rng.shuffle(paths)
        n_val = max(1, round(fraction * len(paths)))
        for i, path in enumerate(paths):
            split = "val" if i < n_val else "train"
            os.symlink(Path(path).resolve(), out / split / index.classes[label] / Path(path).name)
    return out


def main(argv=None) -> dict:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument(
        "--encoders", nargs="+", required=True, help="pretraining run folders (the baseline's), and/or `untrained`"
    )
    parser.add_argument("--data", default=None, help="ImageFolder root with train/ (default: the study's data_root)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--holdout", type=float, default=0.1, help="share of each class of train held out for scoring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="settle", help="file stem of the report under --out")
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    parser.add_argument("--probe-blr", type=float, nargs="*", default=[0.1, 1.0, 10.0])
    parser.add_argument("--probe-epochs", type=int, nargs="*", default=[90])
    parser.add_argument("--probe-batch", type=int, nargs="*", default=[1024])
    parser.add_argument("--finetune-blr", type=float, nargs="*", default=[])
    parser.add_argument("--finetune-epochs", type=float, nargs="*", default=[])
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    study = load_study(args.study)
    data_root = Path(args.data).resolve() if args.data else study.data_root.resolve()
    out = Path(args.out).resolve() if args.out else default_out(study.name) / "settle"
    out.mkdir(parents=True, exist_ok=True)
    holdout = make_holdout(data_root / "train", args.holdout, args.seed, out / "holdout")
    cfg = pretrain_config(study, "baseline", args.seed, study.epochs, data_root, out)
    img_size, ev = cfg.data.crop_size, study.eval
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoders = {
        name: (
            save_untrained_encoder(study, args.seed, data_root, out) if name == "untrained" else Path(name).resolve()
        )
        for name in args.encoders
    }
    encoders = {("untrained" if name == "untrained" else path.name): path for name, path in encoders.items()}
    report: dict = {
        "study": study.name,
        "encoders": {k: str(v) for k, v in encoders.items()},
        "holdout": args.holdout,
        "seed": args.seed,
        "device": device_name(),
        "knn": {},
        "probe": [],
        "finetune": [],
    }
    md = [
        f"# Settling the evaluation of {study.name} (hold-out {args.holdout:.0%} of train, seed {args.seed}, "
        f"{report['device']})",
        "",
    ]

    # --- linear probe grid on cached features, kNN beside it
    base_probe = probe_settings(ev["linprobe"])
    for which, encoder in encoders.items():
        with Stopwatch() as sw:
            features, classes = encoder_features(
                encoder, holdout, img_size, int(ev["knn"]["batch_size"]), int(ev["num_workers"]), device
            )
        (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
        knn = knn_top1(features, len(classes), ev["knn"])
        report["knn"][which] = knn
        md += [
            f"{which}: features of {train_x['cls'].shape[0]} train / {val_x['cls'].shape[0]} hold-out images in "
            f"{sw.wall:.0f}s; kNN on the hold-out: cls {knn['cls']:.2f}, mean {knn['mean']:.2f}",
            "",
            "| encoder | probe blr | epochs | batch | steps | hold-out top-1 | best epoch top-1 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for blr, epochs, batch in itertools.product(args.probe_blr, args.probe_epochs, args.probe_batch):
            fresh_accelerate_state()
            settings = {
                **base_probe,
                "blr": blr,
                "epochs": epochs,
                "global_batch": batch,
                "warmup_epochs": min(base_probe["warmup_epochs"], epochs / 9),
            }
            history = fit_probe_on_features(
                train_x["cls"], train_y, val_x["cls"], val_y, len(classes), seed=args.seed, **settings
            )
            steps = epochs * (train_x["cls"].shape[0] // min(batch, train_x["cls"].shape[0]))
            row = {
                "encoder": which,
                **settings,
                "steps": steps,
                "top1": history[-1]["top1"],
                "best_top1": max(h["top1"] for h in history),
            }
            report["probe"].append(row)
            md.append(
                f"| {which} | {blr:g} | {epochs} | {batch} | {steps} | {row['top1']:.2f} | {row['best_top1']:.2f} |"
            )
            print(md[-1], flush=True)
        md.append("")

    # --- fine-tune grid, the same settings for every encoder
    if args.finetune_blr:
        md += [
            "| encoder | fine-tune blr | epochs | hold-out top-1 (last) | best | wall s | CPU s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
    for blr, epochs in itertools.product(args.finetune_blr, args.finetune_epochs or [None]):
        for which, path in encoders.items():
            extra = [f"optim.blr={blr!r}"] + ([f"train.epochs={epochs!r}"] if epochs else [])
            tag = f"{which}_blr{blr:g}_ep{epochs:g}" if epochs else f"{which}_blr{blr:g}"
            with Stopwatch() as sw:
                ft = run_finetune(study, path, holdout, img_size, args.seed, out / tag, out / f"{tag}.log", extra)
            row = {"encoder": which, "blr": blr, "epochs": epochs, **ft, **sw.as_dict()}
            report["finetune"].append(row)
            md.append(
                f"| {which} | {blr:g} | {epochs if epochs else 'recipe'} | {ft['finetune_top1']:.2f} | "
                f"{ft['finetune_best_top1']:.2f} | {sw.wall:.0f} | {sw.cpu:.0f} |"
            )
            print(md[-1], flush=True)

    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / f'{args.name}.json'}, {out / f'{args.name}.md'}")
    return report


if __name__ == "__main__":
    run_user_command(main)
