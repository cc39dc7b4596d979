"""Whether another checkout trains a study's rows as this one does: the first steps of each row, at the study's
settings and on its data, in both checkouts, their weights compared bit for bit.

    python benchmarks/same_training.py --study configs/study/<name>.yaml --other /work/study2 \
        [--rows et_partial etpp_half_extent_partial] [--steps 3] [--seed 0] [--data DIR]

An edition of the study is trained by one commit. A row added later (an ablation that needs a key the training
commit lacks) is trained by a later commit, and compares with the edition's rows only if that commit trains the
edition's rows exactly as the training commit did. This checks it where it can be checked cheaply: each row (default:
every run of the study config with a budget of its own) is pretrained for --steps optimizer steps by each checkout's
own `pretrain.py` and recipe (a subprocess each, one intra-op thread per the study's `threads`), with the overrides
this checkout's study code gives the row, and the final weights (encoder and decoder) are compared tensor by tensor.
The steps lie in each row's first curriculum stage (with the second edition's rows: 64 px for the plain runs, 48 px
for et, 24 px for etpp), so between them the rows cover the step at each kind of stage. Exit 1 when any row differs.
"""

from __future__ import annotations

if not __package__:  # run as `python benchmarks/same_training.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks import REPO
from benchmarks.study.config import EQUAL_TIME, StudyError, load_study, run_name
from benchmarks.study.runs import pretrain_overrides
from mae_et.cli import OneLineParser, run_user_command


def train_first_steps(
    checkout: Path, recipe: Path, overrides: list[str], out: Path, threads: int | None, log: Path
) -> Path:
    """The row's first steps by `checkout`'s pretrain.py and its own copy of the recipe (the overrides write under
    `out`); the final weights' path."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(checkout / "pretrain.py"), "--config", str(checkout / recipe), *overrides]
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=checkout, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise StudyError(f"{checkout}: pretraining failed (exit {done.returncode}): {tail[0]} (log: {log})")
    found = sorted(out.rglob("checkpoints/step_*/model.safetensors"))
    if len(found) != 1:
        raise StudyError(f"{checkout}: expected one final checkpoint, found {len(found)} (log: {log})")
    return found[0]


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str | None:
    """None when both state dicts are the same tensors bit for bit; else what differs, in one phrase."""
    if a.keys() != b.keys():
        return f"keys differ: {sorted(a.keys() ^ b.keys())[:3]}"
    differ = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if not differ:
        return None

    def gap(k: str) -> float:
        return (a[k].float() - b[k].float()).abs().max().item() if a[k].shape == b[k].shape else float("inf")

    worst = max(differ, key=gap)
    return f"{len(differ)} of {len(a)} tensors differ (largest |difference| {gap(worst):.3g}, in {worst})"


def compare(study_path: Path, other: Path, rows: list[str] | None, steps: int, seed: int, data: Path | None) -> dict:
    study = load_study(study_path)
    other = other.resolve()
    if not (other / "pretrain.py").is_file():
        raise StudyError(f"--other {other}: no pretrain.py there; give the root of another checkout (a git worktree)")
    data_root = (data or study.data_root or Path()).resolve()
    if not data_root.is_dir():
        raise StudyError(f"data {data_root} is not a folder; pass --data with the study's data set")
    fixed = [r for r, spec in study.runs.items() if spec.budget != EQUAL_TIME]
    rows = rows or fixed
    unknown = [r for r in rows if r not in fixed]
    if unknown:
        raise StudyError(f"--rows {unknown}: not runs of {study_path.name} with a budget of their own: {fixed}")
    recipe = study.recipe.resolve().relative_to(REPO)
    results = {}
    with tempfile.TemporaryDirectory(prefix="same_training_") as tmp:
        for row in rows:
            weights = {}
            for side, checkout in (("this", REPO), ("other", other)):
                out = Path(tmp) / side / row
                overrides = pretrain_overrides(
                    study, row, seed, study.epochs * study.runs[row].budget, data_root, out
                ) + [f"train.max_steps={steps}"]
                log = Path(tmp) / f"{side}_{row}.log"
                path = train_first_steps(checkout, recipe, overrides, out, study.threads, log)
                weights[side] = load_file(path)
            diff = difference(weights["this"], weights["other"])
            results[row] = diff
            name = run_name(row, seed)
            print(f"{name}: {steps} steps, " + ("identical weights" if diff is None else f"DIFFER: {diff}"))
    return results


def main(argv=None) -> dict:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, type=Path, help="configs/study/<name>.yaml")
    parser.add_argument("--other", required=True, type=Path, help="the root of the other checkout (a git worktree)")
    parser.add_argument("--rows", nargs="+", help="runs of the study config (default: every one with a budget)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per row, at least 2 (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="the study's data set (default: its data_root)")
    args = parser.parse_args(argv)
    if args.steps < 2:  # the first update runs at the warm-up's lr 0: one step compares the initial weights only
        parser.error("--steps must be at least 2 (the first step's learning rate is the warm-up's 0)")
    results = run_user_command(lambda: compare(args.study, args.other, args.rows, args.steps, args.seed, args.data))
    if any(d is not None for d in results.values()):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
