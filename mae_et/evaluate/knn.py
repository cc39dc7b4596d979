"""Weighted kNN top-1 of any checkpoint's encoder on a labelled ImageFolder (train/ is the bank, val/ is scored).

    mae-et knn RUN_OR_CHECKPOINT --data /path/to/imagenet [--k 20 --temperature 0.07]

The classifier is the pretraining loop's monitor's (`mae_et.models.features.knn_evaluate`), so it gives the numbers
a run logs, for any checkpoint `load_pretrained_vit` reads.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mae_et.cli import OneLineParser, run_user_command
from mae_et.data.folder import DataError
from mae_et.data.sources import check_splits_apart
from mae_et.files import check_output_file, write_json_atomic
from mae_et.models.features import knn_evaluate
from mae_et.models.vit import load_pretrained_vit
from mae_et.recipes import ConfigError

__all__ = ["main"]


def _split_dir(root: Path, split: str, flag: str) -> Path:
    path = root / split if split else root
    if not path.is_dir():
        raise DataError(
            f"split folder '{path}' does not exist; fix --data or {flag} (ImageFolder layout "
            "ROOT/SPLIT/<class>/<image>)"
        )
    return path


def check_args(args: argparse.Namespace) -> None:
    """Every value in one line before any work (argparse checks only the types)."""
    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--img-size", args.img_size)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device '{args.device}' is not a device; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} needs a GPU, and torch sees none here; use --device cpu")


def build_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(
        prog=prog,
        description="Weighted kNN top-1 (k=20, T=0.07) of a pretrained encoder's cls and mean-pooled features",
    )
    parser.add_argument("checkpoint", help="run folder, checkpoint folder, official MAE .pth or timm state dict")
    parser.add_argument("--data", required=True, help="ImageFolder root holding the train and val splits")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--img-size", type=int, default=None, help="default: the size the encoder was pretrained at")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the accuracies to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser


def run_knn(args: argparse.Namespace) -> None:
    """The accuracies printed (and written to --json), every input checked before the work."""
    check_args(args)
    root = Path(args.data)
    if args.json:  # checked before the work, not after it
        check_output_file(
            args.json, reads=[args.checkpoint, root], overwrite=args.overwrite, flag="--json", suffix=".json"
        )
    train_root = _split_dir(root, args.train_split, "--train-split")
    val_root = _split_dir(root, args.val_split, "--val-split")
    check_splits_apart(train_root, "--train-split", val_root, "--val-split")  # else it scores its own bank
    model, spec = load_pretrained_vit(args.checkpoint, img_size=args.img_size)
    img_size = args.img_size or spec.img_size
    model.to(args.device)
    results = knn_evaluate(
        model,
        train_root,
        val_root,
        img_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        k=args.k,
        temperature=args.temperature,
        device=args.device,
    )
    for key, value in results.items():
        print(f"{key}: {value:.2f}")
    if args.json:
        write_json_atomic(
            args.json,
            {
                **results,
                "checkpoint": str(args.checkpoint),
                "img_size": img_size,
                "k": args.k,
                "temperature": args.temperature,
            },
        )


def main(argv: Sequence[str] | None = None, prog: str = "python -m mae_et.evaluate.knn") -> int:
    args = build_parser(prog).parse_args(argv)
    run_user_command(lambda: run_knn(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
