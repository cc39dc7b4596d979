"""A study's speed-ups from step costs measured side by side, which other work on a shared machine cannot skew.

    python benchmarks/step_costs.py --study configs/study/imagenette_vit-t8_64px_20e_partial_cpu.yaml \
        --images 9469 --out benchmarks/results/step_costs

The study's long runs measure their own CPU time, hours apart; anything else on the machine meanwhile inflates
some runs more than others (on this 2-vCPU host a test run doubled a run's CPU seconds per step). But a run's
weights do not depend on its clock, and its cost is the sum over its curriculum stages of steps x the cost of
one step at that stage's input size B. So this measures that cost for every (run, B) the study's plans use, as
peer_cpu.py does: the training loop's own step (`TrainStep`, the run's model config: decoded share, target,
positions) on the same uint8 batch, a few steps per contender, in rounds whose order rotates, in one process, so
every contender meets the same machine; medians of process CPU time (and wall) per step. Then per run:
predicted CPU seconds = sum over stages of planned steps x median cost at B; speed-up = baseline's / run's.
Runs whose steps are the same (the same model and train settings at another budget) are timed once (`timed_as`).
`--ablations` adds the rows of those ablations of the study.

Runs with an equal_time budget are left out (their budget comes from the measured runs). One intra-op thread by
default, as the study. Writes <out>/step_costs.json (every timed run, medians, per-run predictions and speed-ups)
and step_costs.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/step_costs.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import REPO
from benchmarks.peer_cpu import RowSpec, TimedSteps, alternate, checked_out, write_result
from benchmarks.study.config import BASELINE, EQUAL_TIME, StudyError, load_study, split_row
from benchmarks.study.runs import planned_stages, pretrain_overrides
from benchmarks.throughput import fresh_accelerator
from mae_et.cli import OneLineParser, run_user_command
from mae_et.recipes import ConfigError, config_to_dict
from mae_et.train.config import load_pretrain_config
from mae_et.train.step import build_training


class StageStep(TimedSteps):
    """One run's training step at one input size B (the run's TrainStep, shared by its sizes)."""

    def __init__(self, run: str, size: int, step, images: torch.Tensor, patch: int, steps: int):
        self.name = f"{run}@{size}"
        # the fields TimedSteps reads: batch, B and patch (the mask noise's shape), steps per timed run
        self.row = RowSpec(self.name, "", patch, size, (0, 0, 0), images.shape[0], steps)
        self.run = lambda noise: step(images, size, noise)


def plans(study, steps_per_epoch: int, data_root: Path, out: Path, ablations: list[str] = ()) -> dict[str, dict]:
    """{row: {"cfg", "stages": [(B, steps)]}} for every run with a fixed budget, then each ablation's rows."""
    rows = [r for r, spec in study.runs.items() if spec.budget != EQUAL_TIME]
    rows += [f"{run}+{name}" for name in ablations for run in study.ablations[name].runs]
    out_plans = {}
    for row in rows:
        epochs = study.epochs * study.runs[split_row(row)[0]].budget
        overrides = pretrain_overrides(study, row, 0, epochs, data_root, out)
        # nothing is read: the configs only shape the models and the plans
        cfg = load_pretrain_config(study.recipe, [*overrides, "data.source=fractal"])
        out_plans[row] = {"cfg": cfg, "stages": planned_stages(cfg, steps_per_epoch)}
    return out_plans


def step_settings(cfg) -> str:
    """What decides one step's cost at a given B: the model, the frequency mode and the train settings (not the
    budget or the schedule, which only decide how many steps run at each B)."""
    d, t = config_to_dict(cfg), cfg.train
    train = [t.batch_size, t.accum_steps, t.precision, t.compile, cfg.data.crop_size, cfg.optim.clip_grad]
    return json.dumps([d["model"], cfg.curriculum.mode, train], sort_keys=True)


def measure(study, steps_per_epoch: int, rounds: int, warmup: int, steps: int, ablations: list[str] = ()) -> dict:
    run_plans = plans(study, steps_per_epoch, REPO, REPO / "runs" / "step_costs", ablations)
    contenders, timed_as, first_at = [], {}, {}  # timed_as: {run@B: the contender timed for it (the same step)}
    for run, p in run_plans.items():
        cfg, step, images = p["cfg"], None, None
        for b in sorted({b for b, _ in p["stages"]}):
            timed_as[f"{run}@{b}"] = first_at.setdefault((step_settings(cfg), b), f"{run}@{b}")
            if timed_as[f"{run}@{b}"] != f"{run}@{b}":
                continue  # the same step as another run's at this size (another budget): timed once
            if step is None:
                sizes = tuple(sorted({b for b, _ in p["stages"]}))
                _, _, step = build_training(cfg, fresh_accelerator(cfg.train.precision), 1e-4, sizes)
                crop, batch = cfg.data.crop_size, cfg.train.batch_size
                images = torch.randint(
                    0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
                )  # (n, 3, S, S), the same for every run
            contenders.append(StageStep(run, b, step, images, cfg.model.patch_size, steps))
    row = RowSpec("stages", "", 0, 0, (0, 0, 0), 0, steps)
    runs, order, timed = alternate(contenders, row, rounds, warmup)
    med = {name: timed[first] for name, first in timed_as.items()}  # every run@B, a shared step's under each name
    predicted = {}
    for run, p in run_plans.items():
        predicted[run] = {
            clock: sum(n * med[f"{run}@{b}"][clock] for b, n in p["stages"]) for clock in ("cpu_s", "wall_s")
        }
        predicted[run]["stages"] = p["stages"]
    speedups = {
        run: {clock: predicted[BASELINE][clock] / predicted[run][clock] for clock in ("cpu_s", "wall_s")}
        for run in predicted
    }
    same = {name: first for name, first in timed_as.items() if name != first}
    return {"runs": runs, "order": order, "median": med, "timed_as": same, "predicted": predicted, "speedups": speedups}


def markdown(result: dict) -> str:
    lines = [
        f"step costs side by side, {result['device']}, {result['threads']} thread(s), torch {result['torch']}; "
        f"study {result['study']}; medians of {result['rounds']} rotating rounds of {result['steps']} steps",
        "",
        "| run | stages (B x steps) | predicted CPU s | predicted wall s | speed-up (CPU) | speed-up (wall) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run, p in result["predicted"].items():
        stages = ", ".join(f"{b} x {n}" for b, n in p["stages"])
        s = result["speedups"][run]
        lines.append(
            f"| {run} | {stages} | {p['cpu_s']:.1f} | {p['wall_s']:.1f} | {s['cpu_s']:.2f}x | {s['wall_s']:.2f}x |"
        )
    lines += ["", "| run @ B | CPU s / step | wall s / step |", "| --- | --- | --- |"]
    lines += [
        f"| {name} | {m['cpu_s']:.4f} | {m['wall_s']:.4f} |"
        for name, m in result["median"].items()
        if name not in result["timed_as"]
    ]
    if result["timed_as"]:
        same = ", ".join(f"{a} as {b}" for a, b in result["timed_as"].items())
        lines += ["", f"Timed once for runs with the same step: {same}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="configs/study/<name>.yaml")
    parser.add_argument(
        "--images",
        type=int,
        required=True,
        help="training images of the study's data (9469 for the full Imagenette): the plans' steps per epoch",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rotating rounds (at least 5 for a figure)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, as the study)")
    parser.add_argument(
        "--ablations", nargs="*", default=[], help="the study's ablations whose rows are predicted too ('all': each)"
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "step_costs"), help="folder for step_costs.json and .md")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, args.threads, args.images) < 1 or args.warmup < 0:
        raise ConfigError("--rounds, --steps, --threads and --images must be >= 1 and --warmup >= 0")
    out = checked_out(args.out, "step_costs", args.overwrite)
    study = load_study(args.study)
    ablations = list(study.ablations) if args.ablations == ["all"] else args.ablations
    unknown = [a for a in ablations if a not in study.ablations]
    if unknown:
        has = ", ".join(study.ablations) or "none"
        raise StudyError(f"--ablations {unknown} are not in {args.study}; it has: {has}")
    torch.set_num_threads(args.threads)
    batch = load_pretrain_config(study.recipe, [*study.overrides, "data.source=fractal"]).train
    steps_per_epoch = args.images // (batch.batch_size * batch.accum_steps)
    load_before = os.getloadavg()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": args.threads,
        "torch": torch.__version__,
        "study": study.name,
        "images": args.images,
        "steps_per_epoch": steps_per_epoch,
        "rounds": args.rounds,
        "steps": args.steps,
        "command": "python benchmarks/step_costs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **measure(study, steps_per_epoch, args.rounds, args.warmup, args.steps, ablations),
    }
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    return write_result(out, "step_costs", result, markdown)


if __name__ == "__main__":
    run_user_command(main)
