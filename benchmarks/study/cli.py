"""The study's command line (`python benchmarks/curriculum_vs_baseline.py ...`): the arguments, their checks, the
study folder and its locks, and the top-level flow: configs checked, state opened, the plan printed, the compile
warm-up, the rows pretrained and evaluated (or only read back), then the report written, printed and published."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import benchmarks.study
from benchmarks import REPO
from benchmarks.study.config import BASELINE, EQUAL_TIME, Study, StudyError, load_study
from benchmarks.study.evaluation import recheck
from benchmarks.study.flow import StudyOptions, StudyRun, study_options
from benchmarks.study.paths import default_out, published_folder
from benchmarks.study.report import (
    Session,
    build_report,
    checked_configs,
    print_report,
    publish,
    replaced_session,
    report_from_state,
    this_session,
    write_report,
)
from benchmarks.study.runs import planned_stages, train_flops, warm_compile
from benchmarks.study.state import STATE_FILE, StudyState, open_state, study_roles
from mae_et.cli import OneLineParser, run_user_command
from mae_et.data.folder import scan_image_folder
from mae_et.files import FileError, RunFolderBusy, check_output_folder

ENTRY_SCRIPT = REPO / "benchmarks" / "curriculum_vs_baseline.py"  # what the warm-up's own process runs
EVAL_ONLY_POLL_S = 30  # --poll-seconds


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Which study, on which data, into which folder, which seeds, how runs launch."""
    parser.add_argument("--study", required=True, help="configs/study/<name>.yaml")
    parser.add_argument(
        "--data", default=None, help="ImageFolder root with train/ and val/ (default: the study's data_root)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/study/<study name>/)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="train.seed of each repetition (default: the study's)"
    )
    parser.add_argument(
        "--launch",
        choices=("auto", "subprocess", "inprocess"),
        default="auto",
        help="pretraining runs as `python pretrain.py` subprocesses or in this process "
        "(auto: subprocess with a GPU, in-process without)",
    )


def add_part_arguments(parser: argparse.ArgumentParser) -> None:
    """Which part of the study this process does."""
    parser.add_argument(
        "--pretrain-only",
        action="store_true",
        help="run (or resume) the pretraining runs of every seed and stop before evaluating (e.g. to settle "
        "the evaluation protocol on the baseline encoder meanwhile)",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="pretrain nothing: evaluate each run as soon as another study process (--pretrain-only) has "
        "pretrained it, waiting for the rest; the two share state.json, so evaluation runs beside "
        "pretraining, e.g. one process per core",
    )
    parser.add_argument("--poll-seconds", type=float, default=EVAL_ONLY_POLL_S, help=argparse.SUPPRESS)


def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """Rows beyond the study's runs (ablations), and finished rows evaluated again."""
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=[],
        help="ablations of the study config to add (rows '<run>+<name>', each pretrained and evaluated "
        "after the main runs of each seed); 'all' for every one",
    )
    parser.add_argument(
        "--ablation-seeds",
        nargs="+",
        default=None,
        metavar="SEED|NAME=SEED,SEED",
        help="the seeds that get the ablation rows (default: every seed), for all ('0') or per ablation "
        "('pos_extent=0,1 warmup20=0'; unnamed ones get the plain seeds given, else every seed); "
        "each must be one of --seeds, whose baseline and run the ablation is compared with",
    )
    parser.add_argument(
        "--recheck",
        nargs="+",
        default=None,
        metavar="ROW:SEED",
        help="evaluate these finished encoders again (into <out>/recheck/) and print each number beside "
        "the stored one; trains nothing, changes nothing in state.json",
    )


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The report only, and its publication."""
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train and evaluate nothing: write results.json, table.md and the plot from state.json (every row "
        "asked for must be in it, evaluated) and the study config; the session's date, device, torch, launch, "
        "image count and warm-up, which state.json does not hold, are kept from the results.json it replaces "
        "(--out's, else the published one)",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="also copy results.json, table.md and the plot to benchmarks/results/<study name>/ (committed)",
    )
    parser.add_argument("--warm-compile", action="store_true", help=argparse.SUPPRESS)  # the warm-up's own process


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=benchmarks.study.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in (add_study_arguments, add_part_arguments, add_row_arguments, add_report_arguments):
        add(parser)
    return parser


def check_parts(args: argparse.Namespace) -> None:
    if args.eval_only and args.pretrain_only:
        raise StudyError("--eval-only and --pretrain-only exclude each other: run one process with each")
    if args.report_only and (args.eval_only or args.pretrain_only or args.recheck):
        raise StudyError(
            "--report-only trains and evaluates nothing: give it without --pretrain-only, --eval-only or --recheck"
        )


def data_root_of(args: argparse.Namespace, study: Study) -> Path:
    """--data or the study's data_root, resolved; with train/ and val/ unless only the report is written."""
    data_root = Path(args.data) if args.data else study.data_root
    if data_root is None or (
        not args.report_only and (not (data_root / "train").is_dir() or not (data_root / "val").is_dir())
    ):
        raise StudyError(
            f"data root '{data_root}' needs train/ and val/ class folders; pass --data /path/to/imagenette "
            "(for the full Imagenette: ../shared/data/README.md)"
        )
    return data_root.resolve()


def out_of(args: argparse.Namespace, study: Study, data_root: Path) -> Path:
    """--out (default runs/study/<name>/), which may not overlap the data."""
    out = Path(args.out).resolve() if args.out else default_out(study.name)
    try:
        check_output_folder(out, reads=[data_root], flag="--out")
    except FileError as e:
        raise StudyError(str(e)) from None
    return out


def roles_of(args: argparse.Namespace) -> list[str]:
    """The study folder's roles this process plays (`study_roles`): --recheck none, a report the evaluation's."""
    if args.recheck:
        return []
    if args.pretrain_only:
        return ["pretrain"]
    if args.eval_only or args.report_only:
        return ["eval"]
    return ["pretrain", "eval"]


def main(argv=None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_parts(args)
    study = load_study(args.study)
    data_root = data_root_of(args, study)
    out = out_of(args, study, data_root)
    if args.warm_compile:  # launched by a study process that holds the locks
        warm_compile(study, data_root, out)
        return {}
    out.mkdir(parents=True, exist_ok=True)
    try:
        with study_roles(out, roles_of(args)):
            return run_study(args, study, data_root, out)
    except RunFolderBusy as e:
        raise StudyError(str(e)) from None


# ----------------------------------------------------------------------------- the flow, once the folder is ours


def options_of(args: argparse.Namespace, study: Study) -> StudyOptions:
    part = "pretrain" if args.pretrain_only else "eval" if args.eval_only else "report" if args.report_only else "all"
    launch = args.launch if args.launch != "auto" else ("subprocess" if torch.cuda.is_available() else "inprocess")
    return study_options(
        study, args.seeds, args.ablations, args.ablation_seeds, part=part, launch=launch, poll_seconds=args.poll_seconds
    )


def prepare_process(study: Study, out: Path) -> dict[str, str]:
    """The study folder's parts, this process's threads, and the environment of every launched run."""
    for sub in ("runs", "eval", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # a study-local inductor cache: filled by the warm-up, shared by every run of this study
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")}
    if study.threads:  # this process (in-process runs, evaluation) and every launched run
        torch.set_num_threads(study.threads)
        env["OMP_NUM_THREADS"] = str(study.threads)
    return env


def training_images(data_root: Path, session: Session | None, out: Path, published: Path) -> int:
    """How many training images the data has: counted, or, for a report, the replaced report's count."""
    if session is not None:
        return session.num_train_images
    if not (data_root / "train").is_dir():
        raise StudyError(
            f"--report-only: no results.json in {out} or {published} to take the session's facts from, and no "
            f"data root '{data_root}' to count the training images of; pass --data"
        )
    return len(scan_image_folder(data_root / "train").samples)


def print_plan(study: Study, cfgs: dict, options: StudyOptions, num_images: int, out: Path, state: StudyState) -> None:
    """The study's shape, and per run with a budget of its own its planned steps, sizes and FLOPs."""
    base_cfg = cfgs[BASELINE]
    m, batch = base_cfg.model, base_cfg.train.batch_size * base_cfg.train.accum_steps
    print(
        f"study {study.name}: {m.size}/{m.patch_size} (decoder {m.decoder_embed_dim} x {m.decoder_depth}) at "
        f"{base_cfg.data.crop_size} px, E = {study.epochs:g}, batch {batch}, {base_cfg.train.precision}, compile "
        f"{base_cfg.train.compile}, {num_images} training images, seeds {options.seeds}, launch {options.launch}, "
        f"verdicts on {study.verdict_clock} time; out {out}"
        + (" (resuming: finished runs and evaluations are read back)" if state.data["runs"] else "")
    )
    rate = study.peak_tflops * study.assumed_mfu * 1e12
    for run in [r for r, spec in study.runs.items() if spec.budget != EQUAL_TIME]:
        stages = planned_stages(cfgs[run], num_images // batch)
        flops = train_flops(cfgs[run], stages)
        print(
            f"  plan {run}: {sum(n for _, n in stages)} steps at B {'/'.join(str(b) for b, _ in stages)}, "
            f"{flops / 1e15:.3g} PFLOP "
            f"(~{flops / rate:.0f} s at {100 * study.assumed_mfu:.0f}% of {study.peak_tflops:g} TFLOP/s)"
        )


def warm_up(study: Study, options: StudyOptions, base_cfg, data_root: Path, out: Path, env: dict) -> float | None:
    """Before the first run of a process that trains: compiled, the throwaway steps of `warm_compile` (in its own
    process when runs are); in-process, the first run would also pay this process's one-time costs (lazy kernels,
    allocator, thread pools), which the throwaway steps take for every run, compiled or not. Its seconds, or None."""
    if not (
        (base_cfg.train.compile != "none" or options.launch == "inprocess") and options.part in ("all", "pretrain")
    ):
        return None
    t0 = time.perf_counter()
    if options.launch == "subprocess":
        cmd = [sys.executable, str(ENTRY_SCRIPT), "--study", str(study.path), "--data", str(data_root)]
        cmd += ["--out", str(out), "--warm-compile"]
        with open(out / "logs" / "compile_warmup.log", "w") as log:
            if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode != 0:
                raise StudyError(f"the compile warm-up failed; see {out / 'logs' / 'compile_warmup.log'}")
    else:
        warm_compile(study, data_root, out)
    warmup_s = time.perf_counter() - t0
    print(f"warm-up (compile and first-use costs): {warmup_s:.0f}s (not part of any run)")
    return warmup_s


def run_study(args: argparse.Namespace, study: Study, data_root: Path, out: Path) -> dict[str, Any]:
    """The study, once its folder is this process's (`main` checked the arguments and took the locks)."""
    options = options_of(args, study)
    env = prepare_process(study, out)
    cfgs = checked_configs(study, data_root, out, reads_data=not args.report_only)
    base_cfg, published = cfgs[BASELINE], published_folder(study.name)
    session = replaced_session(out, published) if args.report_only else None
    num_images = training_images(data_root, session, out, published)
    state = open_state(out, published)
    if args.recheck:
        return recheck(study, state, args.recheck, data_root, base_cfg.data.crop_size, out)
    print_plan(study, cfgs, options, num_images, out, state)
    if args.report_only:
        session = session or this_session(options.launch, num_images, None)
        report = report_from_state(study, state, options, session, data_root, out, out)
    else:
        warmup_s = warm_up(study, options, base_cfg, data_root, out, env)
        run = StudyRun(study, data_root, out, state, options, base_cfg.data.crop_size, env)
        run.run()
        if options.part == "pretrain":
            print(
                f"pretraining done for seeds {options.seeds}; {out / STATE_FILE} holds it. Run without "
                "--pretrain-only to evaluate."
            )
            return {"runs": run.results, "equal_time": run.equal_time}
        report = build_report(run, base_cfg, this_session(options.launch, num_images, warmup_s))
        write_report(report, out)
    print_report(report, out)
    if args.publish:
        publish(out, published)
    return report.result


def run_command() -> None:
    """`python benchmarks/curriculum_vs_baseline.py ...`: a study error or a config error is one line, exit 2, as
    for every entry point (`mae_et.cli.run_user_command`)."""
    run_user_command(main)
