"""One bounded speed check of the whole project on a GPU: every figure, in one process, within a wall-clock budget.

    python3 benchmarks/gpu_check.py --data .data/imagenette-travel --out $OUT    # the device call: BENCHMARKS.md
    python benchmarks/gpu_check.py --dry-run --data ../shared/data/imagenette-mini --out /tmp/gpu_check   # CPU, tiny

Sections in order of value: the train step, ours beside Hugging Face's ViTMAE (eager, decoding a share, compiled);
end to end; the HOG target; the fractal renderer; a baseline-vs-et training probe. What no longer fits is skipped
with its reason; gpu_check.json and gpu_check.md are rewritten after every row. Design: docs/design.md.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()  # the budget counts from here: the heavy imports (torch, transformers) included

import torch  # noqa: E402

if not __package__:  # run as `python benchmarks/gpu_check.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import REPO  # noqa: E402
from benchmarks.gpu.plan import DRY_PLAN, GPU_PLAN, Plan, environment  # noqa: E402
from benchmarks.gpu.report import Report, free_memory  # noqa: E402
from benchmarks.gpu.sections import end_to_end_rows, fractal_rows, hog_rows, make_jpeg_folder, probe  # noqa: E402
from benchmarks.gpu.steps import StepBench, step_ratios  # noqa: E402
from benchmarks.gpu.tables import STEP_HEAD, markdown, table, targets  # noqa: E402
from benchmarks.throughput import COMPUTE_DTYPES, matmul_tflops  # noqa: E402
from mae_et.cli import OneLineParser, run_user_command  # noqa: E402

TRAVEL_DATA = REPO / ".data" / "imagenette-travel"


def parse_args(argv):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", required=True, help="folder for gpu_check.json and gpu_check.md (the device tool's $OUT)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help=f"ImageFolder for sections c and e (default: {TRAVEL_DATA.relative_to(REPO)} when present, "
        "else JPEGs made on the spot)",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run")
    parser.add_argument(
        "--compile-cap-s", type=float, default=300.0, help="seconds all torch.compile graphs may take together"
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled rows")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="MFU denominator (default: the matmul measured here)"
    )
    parser.add_argument("--dry-run", action="store_true", help="the same branches on any device, tiny (CI)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["hf", "compile", "large", "e2e", "hog", "fractal", "probe"],
        help="sections to leave out (recorded as skipped)",
    )
    return parser.parse_args(argv)


def resolve_data(args, plan: Plan, tmp: Path) -> Path:
    if args.data:
        return Path(args.data).resolve()
    if TRAVEL_DATA.is_dir() and not args.dry_run:
        return TRAVEL_DATA
    per_class = max(plan.probe_batch, plan.models[0][1]) * 2  # a few steps per epoch at the largest batch
    print(f"no --data: writing {2 * per_class} JPEGs to {tmp}")
    return make_jpeg_folder(tmp / "jpegs", per_class)


def step_section(report: Report, plan: Plan, args, bench: StepBench, crop: int) -> None:
    """a + b: ours and the HF peer, eager, every model; then ours compiled, in order of value; the ratios."""
    print("\n".join(table("Train step", STEP_HEAD, [])[-2:]), flush=True)
    for index, (model_size, batch, _) in enumerate(plan.models):
        if index > 0 and "large" in args.skip:
            report.skip("step", f"model {model_size} b{batch}", "--skip large")
            bench.left_out.add(index)
            continue
        bench.ours_eager(index)
        if index == 0:
            bench.partial_eager(index)
        if "hf" not in args.skip:
            bench.hf(index)
    if "hf" in args.skip:
        report.skip("step", "hf", "--skip hf")
    step_ratios(report, crop)  # now, in case the compiled rows outlast the tool's limit
    if "compile" in args.skip:
        report.skip("step", "compiled rows", "--skip compile")
    else:
        bench.compiled(args.compile_mode)
    step_ratios(report, crop)
    for index in range(1, len(plan.models)):
        bench.drop(index)


def section(report: Report, args, name: str, run) -> None:
    if name in args.skip:
        report.skip(name, "all", f"--skip {name}")
    else:
        run()


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    header = {
        **environment(),
        "dry_run": args.dry_run,
        "args": vars(args),
        "compile_mode": args.compile_mode,
        "compile_backend": plan.compile_backend,
        "plan": plan.__dict__,
    }
    report = Report(Path(args.out), args.budget_s, header, t0=T0 if argv is None else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # in the dtype its step rows compute in (bf16 on a GPU): an fp32 row is not measured against a bf16 peak
    base_cfg = plan.row_config()
    peak_dtype = COMPUTE_DTYPES[base_cfg.train.precision]
    report.data["matmul_dtype"] = str(peak_dtype)[6:]
    report.data["matmul_tflops"] = matmul_tflops(
        device, plan.matmul_n if device.type == "cuda" else min(plan.matmul_n, 1024), peak_dtype
    )
    report.data["peak_tflops"] = args.peak_tflops or report.data["matmul_tflops"]
    print(
        f"{report.data['device']}; torch {report.data['torch']}; transformers {report.data['transformers']}; "
        f"matmul {report.data['matmul_tflops']:.1f} TFLOP/s; budget {args.budget_s:.0f} s",
        flush=True,
    )
    if not torch.cuda.is_available():
        report.skip("step", "peak memory", "CUDA only: torch.cuda.max_memory_allocated")
    crop = base_cfg.data.crop_size

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        bench = StepBench(report, plan, args)
        step_section(report, plan, args, bench, crop)
        data_root = resolve_data(args, plan, Path(tmp)) if {"e2e", "probe"} - set(args.skip) else None
        report.data["data"] = str(data_root)
        section(report, args, "e2e", functools.partial(end_to_end_rows, report, plan, bench, data_root))
        section(report, args, "hog", functools.partial(hog_rows, report, plan, bench))
        bench.drop(0)
        del bench  # its Accelerator holds every model it prepared
        torch._dynamo.reset()  # and the compiled graphs theirs
        free_memory()
        section(report, args, "fractal", lambda: fractal_rows(report, plan, device))
        section(report, args, "probe", lambda: probe(report, plan, data_root))

    report.data["targets"] = targets(report.data, plan, crop)
    report.save()
    print(markdown(report.data), flush=True)
    print(f"wrote {report.out / 'gpu_check.json'} and gpu_check.md in {report.elapsed():.0f} s")
    return report.data


if __name__ == "__main__":
    run_user_command(main)
