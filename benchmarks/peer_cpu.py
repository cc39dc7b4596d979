"""Ours (every masked patch decoded, and a share of them) beside Hugging Face's ViTMAEForPreTraining, on this CPU.

    python benchmarks/peer_cpu.py --out benchmarks/results/peer_cpu

The contenders (ours full, ours partial, HF full: the same model, batch, fp32, fused AdamW, grad clip 1.0 and mask
noise) alternate in rotating rounds in one process; medians of CPU and wall time per step, and ours / HF per row.
Rows: the study's ViT-Tiny/8 at 64 px and ViT-S/16 at 224 with MAE's decoder; one intra-op thread by default. Also
the alternating harness hog_cost.py and step_costs.py share. Writes <out>/peer_cpu.json and peer_cpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

if not __package__:  # run as `python benchmarks/peer_cpu.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import REPO
from benchmarks.study import config as study
from benchmarks.throughput import count_params, fresh_accelerator, hf_training
from mae_et.cli import OneLineParser, run_user_command
from mae_et.data.folder import normalize_on_device
from mae_et.files import FileError, check_output_folder, write_text_atomic
from mae_et.recipes import ConfigError
from mae_et.train.pretrain import mask_noise
from mae_et.train.step import build_training

RECIPE = REPO / "configs" / "pretrain" / "mae_vit-base-p16_baseline_800e_imagenet.yaml"
CLIP = 1.0
PARTIAL = 0.25  # CrossMAE's kept mask ratio: a quarter of all patches decoded
TARGETS = {
    "full_vs_hf_max_time_ratio": 1.05,  # ours full within 5% of HF on the same work
    "partial_vs_hf_min_speedup_vit-s16_224px": 1.5,
}  # ours partial >= 1.5x faster than HF full at ViT-S/16 224


@dataclass(frozen=True)
class RowSpec:
    name: str
    size: str
    patch: int
    img: int
    decoder: tuple[int, int, int]  # width, depth, heads
    batch: int
    steps: int  # timed steps per run


ROWS = {
    "vit-t8_64px": RowSpec("vit-t8_64px", "tiny", 8, 64, (128, 2, 4), 128, 4),  # the CPU study's shape
    "vit-s16_224px": RowSpec("vit-s16_224px", "small", 16, 224, (512, 8, 16), 16, 3),  # MAE's decoder
    "micro": RowSpec("micro", "micro", 8, 32, (32, 1, 2), 4, 1),  # the test suite's
}


def row_config(row: RowSpec, decode_fraction: float, *more: str):
    """A row on the base recipe: its shape, fp32, eager, grad clip CLIP, `decode_fraction` of the patches decoded,
    then `more` (hog_cost.py's target); no image is read."""
    width, depth, heads = row.decoder
    return study.row_config(
        RECIPE,
        f"model.patch_size={row.patch}",
        f"model.decoder_embed_dim={width}",
        f"model.decoder_depth={depth}",
        f"model.decoder_num_heads={heads}",
        "model.norm_pix_loss=true",
        f"model.decode_fraction={decode_fraction}",
        f"data.crop_size={row.img}",
        "train.accum_steps=1",
        "train.precision=fp32",
        "train.compile=none",
        f"optim.clip_grad={CLIP}",
        *more,
        model=row.size,
        batch=row.batch,
        reads_data=False,
    )


class TimedSteps:
    """Something to time per training step: `run(noise)` does one step; each step gets fresh mask noise, the same
    for every contender of a row. Subclasses set name, row and run."""

    name: str
    row: RowSpec
    run: Callable[[torch.Tensor], object]  # one training step with this (n, L) mask noise

    def noise(self, i: int) -> torch.Tensor:
        return mask_noise(
            0, i, 0, 0, (self.row.batch, (self.row.img // self.row.patch) ** 2), torch.device("cpu")
        )  # (n, L)

    def timed(self, first_step: int, steps: int) -> dict[str, float]:
        noises = [self.noise(first_step + i) for i in range(steps)]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for noise in noises:
            self.run(noise)
        return {"wall_s": (time.perf_counter() - wall0) / steps, "cpu_s": (time.process_time() - cpu0) / steps}


def random_images(row: RowSpec) -> torch.Tensor:
    """(n, 3, S, S) uint8, the same for every contender (seeded)."""
    return torch.randint(
        0, 256, (row.batch, 3, row.img, row.img), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def alternate(contenders: list[TimedSteps], row: RowSpec, rounds: int, warmup: int) -> tuple[dict, list, dict]:
    """Warm every contender up, then `rounds` rounds of `row.steps` timed steps each, the order rotating each round
    so none always runs first or last: (runs per contender, the orders, medians per contender and clock)."""
    for c in contenders:  # first-use costs (allocator, thread pools, lazy kernels) out of the timed runs
        for i in range(warmup):
            c.run(c.noise(10_000 + i))
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    order_log = []
    for r in range(rounds):
        shift = r % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        order_log.append([c.name for c in order])
        for c in order:
            runs[c.name].append(c.timed(r * row.steps, row.steps))
        print(
            f"  {row.name} round {r + 1}/{rounds}: "
            + ", ".join(f"{name} {runs[name][-1]['cpu_s']:.4f} CPU-s/step" for name in runs),
            flush=True,
        )
    med = {
        name: {clock: statistics.median(x[clock] for x in rs) for clock in ("wall_s", "cpu_s")}
        for name, rs in runs.items()
    }
    return runs, order_log, med


class Contender(TimedSteps):
    """Ours (the training loop's step, decoding `decode_fraction` of the patches) or HF's (decode_fraction None)."""

    def __init__(self, name: str, row: RowSpec, decode_fraction: float | None):
        self.name, self.row = name, row
        cfg = row_config(row, decode_fraction or 1.0)
        self.accelerator = fresh_accelerator("fp32")
        images = random_images(row)  # (n, 3, S, S) uint8
        if decode_fraction is not None:  # ours: the training loop's step
            _, _, self.train_step = build_training(cfg, self.accelerator, 1e-4, (row.img,))
            self.params = count_params(self.accelerator.unwrap_model(self.train_step.model))
            self.images = images  # (n, 3, S, S) uint8, normalised inside the step
            self.run = lambda noise: self.train_step(self.images, row.img, noise)
        else:  # HF: forward, backward, clip, fused AdamW step
            self.model, self.optimizer = hf_training(cfg, self.accelerator)
            self.params = count_params(self.model)
            self.pixels = normalize_on_device(images)  # (n, 3, S, S) float, as our step normalises its input
            self.run = self._hf_step

    def _hf_step(self, noise: torch.Tensor) -> None:
        out = self.model(pixel_values=self.pixels, noise=noise)
        self.accelerator.backward(out.loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def bench_row(row: RowSpec, rounds: int, warmup: int) -> dict:
    contenders = [
        Contender("ours_full", row, 1.0),
        Contender("ours_partial", row, PARTIAL),
        Contender("hf_full", row, None),
    ]
    counts = {c.name: c.params for c in contenders}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"row {row.name}: the models differ ({counts} trainable parameters); nothing to compare")
    runs, order_log, med = alternate(contenders, row, rounds, warmup)
    for m in med.values():
        m["img_s_cpu"], m["img_s_wall"] = row.batch / m["cpu_s"], row.batch / m["wall_s"]
    ratios = {
        f"{ours}_over_hf": {clock: med[ours][clock] / med["hf_full"][clock] for clock in ("cpu_s", "wall_s")}
        for ours in ("ours_full", "ours_partial")
    }
    return {
        "row": row.__dict__,
        "params": counts["ours_full"],
        "decode_fraction_partial": PARTIAL,
        "rounds": rounds,
        "order": order_log,
        "runs": runs,
        "median": med,
        "time_ratio": ratios,
    }


def verdicts(rows: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in rows.items():
        full = r["time_ratio"]["ours_full_over_hf"]["cpu_s"]
        ok = full <= TARGETS["full_vs_hf_max_time_ratio"]
        lines.append(
            f"{name}: ours full / HF full {full:.3f} in CPU time (target <= {TARGETS['full_vs_hf_max_time_ratio']}): "
            f"{'PASS' if ok else 'FAIL'}"
        )
        if name == "vit-s16_224px":
            speed = 1 / r["time_ratio"]["ours_partial_over_hf"]["cpu_s"]
            target = TARGETS["partial_vs_hf_min_speedup_vit-s16_224px"]
            lines.append(
                f"{name}: ours partial {speed:.2f}x faster than HF full in CPU time (target >= {target}x): "
                f"{'PASS' if speed >= target else 'FAIL'}"
            )
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"ours vs Hugging Face ViTMAEForPreTraining, {result['device']}, {result['threads']} thread(s), torch "
        f"{result['torch']}, transformers {result['transformers']}; medians of {result['rounds']} alternating rounds "
        "per contender; time per training step (fp32, fused AdamW, grad clip 1.0)",
        "",
        "| row | batch | contender | decoded share | CPU s / step | wall s / step | img / CPU-s | ours / HF (CPU) | "
        "ours / HF (wall) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["rows"].items():
        for contender, share in (("ours_full", 1.0), ("ours_partial", PARTIAL), ("hf_full", 1.0)):
            m = r["median"][contender]
            ratio = r["time_ratio"].get(f"{contender}_over_hf")
            cells = (f"{ratio['cpu_s']:.3f}", f"{ratio['wall_s']:.3f}") if ratio else ("1", "1")
            lines.append(
                f"| {name} | {r['row']['batch']} | {contender} | {share:g} | {m['cpu_s']:.3f} | {m['wall_s']:.3f} | "
                f"{m['img_s_cpu']:.1f} | {cells[0]} | {cells[1]} |"
            )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in result["verdicts"]) + "\n"


def checked_out(folder: str, name: str, overwrite: bool) -> Path:
    """--out as a Path, refused in one line when it is unsafe or already holds <name>.json (unless overwrite)."""
    out = Path(folder)
    check_output_folder(out, flag="--out")
    if (out / f"{name}.json").exists() and not overwrite:
        raise FileError(f"--out {out} already holds {name}.json; pass --overwrite to replace it, or another --out")
    return out


def write_result(out: Path, name: str, result: dict, markdown: Callable) -> dict:
    """<out>/<name>.json and <name>.md (atomic), the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=2))
    table = markdown(result)
    write_text_atomic(out / f"{name}.md", table)
    print(table)
    return result


def cpu_header(threads: int) -> dict:
    """When, on what and with which torch a CPU benchmark ran."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": threads,
        "torch": torch.__version__,
    }


def command_line(name: str, argv) -> str:
    return f"python benchmarks/{name}.py " + " ".join(argv if argv is not None else sys.argv[1:])


def run_cli(
    argv, doc: str, name: str, bench_row: Callable, verdicts: Callable, markdown: Callable, header: dict | None = None
) -> dict:
    """The command line of an alternating CPU benchmark: rows, rounds, warm-up, threads, --out <name>.json / .md
    (never over an earlier result unless --overwrite); `bench_row(row, rounds, warmup)` measures one row."""
    parser = OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["vit-t8_64px", "vit-s16_224px"], choices=sorted(ROWS))
    parser.add_argument(
        "--rounds", type=int, default=7, help="alternating timed runs per contender (at least 5 for a figure)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: see the docstring)")
    parser.add_argument("--out", default=str(REPO / "runs" / name), help=f"folder for {name}.json and {name}.md")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.warmup < 0:
        raise ConfigError("--rounds and --threads must be >= 1 and --warmup >= 0")
    out = checked_out(args.out, name, args.overwrite)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = {}
    for row in args.rows:
        print(f"row {row}: {ROWS[row]}", flush=True)
        rows[row] = bench_row(ROWS[row], args.rounds, args.warmup)
    result = {
        **cpu_header(args.threads),
        **(header or {}),
        "command": command_line(name, argv),
        "load_average_before_after": [load_before, os.getloadavg()],
        "rounds": args.rounds,
        "rows": rows,
    }
    result["verdicts"] = verdicts(rows)
    return write_result(out, name, result, markdown)


def main(argv=None) -> dict:
    try:
        import transformers
    except ImportError:
        raise ConfigError("Hugging Face transformers is needed for the peer: pip install -e '.[bench]'") from None
    return run_cli(
        argv,
        __doc__,
        "peer_cpu",
        bench_row,
        verdicts,
        markdown,
        {"transformers": transformers.__version__, "targets": TARGETS},
    )


if __name__ == "__main__":
    run_user_command(main)
