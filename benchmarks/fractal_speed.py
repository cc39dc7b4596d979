"""Images per second of the fractal generator, per sample (the loader workers' path) and batched.

    python benchmarks/fractal_speed.py [--sizes 64 224] [--batch 64] [--seconds 3] [--device cuda]

Batched rendering runs on --device (default: CUDA when present, else CPU); per-sample rendering is
what each DataLoader worker does on the CPU. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

if not __package__:  # run as `python benchmarks/fractal_speed.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from mae_et.cli import OneLineParser, run_user_command
from mae_et.data.fractal import FractalDataset, render_fractal, render_fractal_batch


def rate(fn, images_per_call: int, seconds: float, device: torch.device) -> float:
    fn()  # warm-up: system sampling and filtering, allocator, kernels
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return calls * images_per_call / (time.perf_counter() - t0)


def main(argv=None) -> list[dict]:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(
        f"| size | per sample, CPU (img/s, one thread) | batch {args.batch}, {device.type} (img/s) |\n| --- | --- | "
        "--- |"
    )
    for size in args.sizes:
        data = FractalDataset(args.classes, 1000, size, seed=0)
        systems = [data.system(i % args.classes) for i in range(args.batch)]
        counter = iter(range(10**9))
        single = rate(lambda: render_fractal(systems[0], size, next(counter)), 1, args.seconds, torch.device("cpu"))
        batched = rate(
            lambda: render_fractal_batch(systems, [next(counter) for _ in systems], size, device=device),
            args.batch,
            args.seconds,
            device,
        )
        rows.append({"size": size, "single_cpu": single, "batched": batched, "device": device.type})
        print(f"| {size} | {single:,.0f} | {batched:,.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # a loader worker's view; the batched path on a GPU does not care
    run_user_command(main)
