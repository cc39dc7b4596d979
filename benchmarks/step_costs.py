"""A study's speed-ups from step costs measured side by side, which other work on a shared machine cannot skew.

    python benchmarks/step_costs.py --study configs/study/imagenette_vit-t8_64px_20e_partial_cpu.yaml \
        --images 9469 --out benchmarks/results/step_costs

Every (run, B) of the study's plans: the run's own training step timed side by side in rotating rounds (peer_cpu.py's
harness, one process, one thread by default); per run, predicted seconds = sum over its stages of planned steps x the
median step cost at B, and the speed-up over the baseline. Runs with the same step are timed once; --ablations adds
those ablations' rows; equal_time runs are left out. Writes <out>/step_costs.json and step_costs.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/step_costs.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import REPO
from benchmarks.peer_cpu import RowSpec, TimedSteps, alternate, checked_out, command_line, cpu_header, write_result
from benchmarks.study.config import BASELINE, EQUAL_TIME, StudyError, load_study, row_config, split_row
from benchmarks.study.runs import planned_stages, pretrain_config
from benchmarks.throughput import fresh_accelerator
from mae_et.cli import OneLineParser, run_user_command
from mae_et.recipes import ConfigError, config_to_dict
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
        cfg = pretrain_config(study, row, 0, epochs, data_root, out, reads_data=False)  # shapes a model and a plan
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
    batch = row_config(study.recipe, *study.overrides, reads_data=False).train
    steps_per_epoch = args.images // (batch.batch_size * batch.accum_steps)
    load_before = os.getloadavg()
    result = {
        **cpu_header(args.threads),
        "study": study.name,
        "images": args.images,
        "steps_per_epoch": steps_per_epoch,
        "rounds": args.rounds,
        "steps": args.steps,
        "command": command_line("step_costs", argv),
        **measure(study, steps_per_epoch, args.rounds, args.warmup, args.steps, ablations),
    }
    result["load_average_before_after"] = [load_before, os.getloadavg()]
    return write_result(out, "step_costs", result, markdown)


if __name__ == "__main__":
    run_user_command(main)
