"""Training-step and end-to-end throughput of MAE at every curriculum size, on this machine.

    python benchmarks/throughput.py             # GPU: ViT-B/16 batch 256 at B = 224..96, ViT-L/16 batch 128 at 224
    python benchmarks/throughput.py --data /data/imagenette --pipeline memory   # + end-to-end img/s from real JPEGs
    python benchmarks/throughput.py --smoke     # a micro model, seconds, on any device (run by the test suite)
    python benchmarks/throughput.py --rows "tiny:8:64" --compile none --precision fp32  # CPU: this model and size

Per row (model, batch, B): the training loop's own step timed with the input on the device (img/s, ms, peak
memory, FLOPs per image, MFU), and with --data end-to-end img/s and data wait; a Markdown table and JSON (--out).
Only --smoke shrinks what is measured. Its timing pieces serve benchmarks/gpu_check.py and the CPU benchmarks too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

if not __package__:  # run as `python benchmarks/throughput.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import REPO
from benchmarks.study.config import NO_MONITORS, row_config
from benchmarks.study.runs import image_flops
from mae_et.cli import OneLineParser, run_user_command
from mae_et.data.sources import open_source
from mae_et.models.mae import MODEL_SIZES
from mae_et.run.run import MIXED_PRECISION, fresh_accelerate_state
from mae_et.train.optim import build_adamw
from mae_et.train.pretrain import mask_noise
from mae_et.train.step import build_training

GPU_ROWS = "base:256:224,192,160,128,96 large:128:224"
SMOKE_ROWS = "micro:8:48,40,32"
# MFU's denominator, unless --peak-tflops: a dense matmul measured here in the dtype the step computes in, so an
# fp32 run is not divided by a bf16 peak (on an H100, bf16 785 TFLOP/s against fp32 ~50: a 15x error)
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    model: str
    batch: int
    size: int
    step_img_s: float
    step_ms: float
    flops_per_image: float
    mfu: float
    peak_mem_gib: float | None
    e2e_img_s: float | None = None
    e2e_data_wait: float | None = None
    params: int | None = None  # of the model measured: proof of which one it was


def parse_rows(text: str) -> list[tuple[str, int, list[int]]]:
    rows = []
    for item in text.split():
        model, batch, sizes = item.split(":")
        rows.append((model, int(batch), [int(s) for s in sizes.split(",")]))
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def fresh_accelerator(precision: str) -> Accelerator:
    """A new Accelerate state with this precision (bf16 autocast through Accelerate, as in training)."""
    fresh_accelerate_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=MIXED_PRECISION[precision])


def hf_model(cfg):
    """Hugging Face's ViTMAEForPreTraining of the same shape as ours (ViT-B/16: 768/12/12/3072, decoder
    512/8/16/2048): the peer of gpu_check.py and peer_cpu.py."""
    import transformers

    spec, m = MODEL_SIZES[cfg.model.size], cfg.model
    config = transformers.ViTMAEConfig(
        hidden_size=spec["embed_dim"],
        num_hidden_layers=spec["depth"],
        num_attention_heads=spec["num_heads"],
        intermediate_size=4 * spec["embed_dim"],
        decoder_hidden_size=m.decoder_embed_dim,
        decoder_num_hidden_layers=m.decoder_depth,
        decoder_num_attention_heads=m.decoder_num_heads,
        decoder_intermediate_size=4 * m.decoder_embed_dim,
        image_size=cfg.data.crop_size,
        patch_size=m.patch_size,
        mask_ratio=m.mask_ratio,
        norm_pix_loss=m.norm_pix_loss,
        attn_implementation="sdpa",
    )
    return transformers.ViTMAEForPreTraining(config)


def hf_training(cfg, accelerator: Accelerator):
    """The peer and fused AdamW with our weight-decay groups, prepared by `accelerator` (our autocast), training."""
    model = hf_model(cfg)
    optimizer = build_adamw(model, 1e-4, cfg.optim.weight_decay, cfg.optim.betas)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return model, optimizer


@dataclass
class Timing:
    seconds_per_step: float
    first_call_s: float  # the first warm-up call alone: compilation lands here
    peak_mem_gib: float | None  # CUDA only: peak allocated during the timed steps, less `base_bytes`


def time_calls(run, steps: int, warmup: int, device: torch.device, base_bytes: int = 0) -> Timing:
    """Time `run()` (one training step) `steps` times after `warmup` calls (at least one), synchronising the device."""
    sync(device)
    t0 = time.perf_counter()
    run()  # compiles the graph of this size, warms the allocator and the kernels' heuristics
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        run()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated(device) - base_bytes) / 2**30 if device.type == "cuda" else None
    return Timing(seconds, first, peak)


def time_step(step, cfg, size: int, steps: int, warmup: int, device: torch.device, own_peak: bool = False) -> Timing:
    """`step` (a TrainStep of cfg) timed at input size B on a random uint8 batch already on the device. own_peak:
    the peak memory of its own weights, optimizer state and activations (the rest, the batch too, left out)."""
    n, crop = cfg.train.batch_size, cfg.data.crop_size
    images = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, device=device)  # (n, 3, S, S)
    noise = mask_noise(0, 0, 0, 0, (n, (size // cfg.model.patch_size) ** 2), device)  # (n, L)
    others = allocated() - owned_bytes(step.model, step.optimizer) if own_peak else 0
    return time_calls(lambda: step(images, size, noise), steps, warmup, device, others)


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def owned_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the weights and optimizer state of one model: subtracted from what else is on the device."""
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def count_params(model: torch.nn.Module) -> int:
    """Trainable parameters (fixed sin-cos tables left out, which some implementations keep as parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """Dense (n, n) @ (n, n) matmul rate on random data in `dtype`: what the chip really does in that dtype."""
    reps = 50 if device.type == "cuda" else 10  # 50 x 8192^3 bf16 on a GPU: about 70 ms, clocks up
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))  # (n, n) each
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def mfu(flops_per_image: float, img_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the step's images need over the peak."""
    return flops_per_image * img_s / (peak_tflops * 1e12)


def bench_row(
    cfg,
    model_size: str,
    batch: int,
    sizes: list[int],
    steps: int,
    warmup: int,
    peak_tflops: float,
    data_root: str | None,
) -> list[Row]:
    cfg.model.size, cfg.train.batch_size = model_size, batch
    accelerator = fresh_accelerator(cfg.train.precision)
    device = accelerator.device
    _, _, step = build_training(cfg, accelerator, 1e-4, sizes)
    data = open_source(cfg.data, cfg.train.seed, main=True, device=device) if data_root is not None else None
    rows = []
    for size in sizes:
        timing = time_step(step, cfg, size, steps, max(warmup, 1), device)
        img_s = batch / timing.seconds_per_step
        flops = image_flops(cfg, size)
        row = Row(
            model_size,
            batch,
            size,
            img_s,
            1000 * timing.seconds_per_step,
            flops,
            mfu(flops, img_s, peak_tflops),
            timing.peak_mem_gib,
            params=count_params(step.model),
        )
        if data is not None:
            row.e2e_img_s, row.e2e_data_wait = end_to_end(cfg, data, step, size, steps, warmup, device)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def end_to_end(cfg, data, step, size, steps, warmup, device) -> tuple[float, float]:
    """img/s and data-wait fraction with real images through the configured pipeline."""
    batches = data.batches(0, 1, cfg.train.batch_size, start_micro_step=0, num_micro_steps=steps + warmup)
    for _ in range(warmup):
        batch = next(batches)
        step(
            batch.images.to(device, non_blocking=True),
            size,
            mask_noise(0, 0, 0, 0, (batch.images.shape[0], (size // cfg.model.patch_size) ** 2), device),
        )
    sync(device)
    wait, t0 = 0.0, time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        step(
            batch.images.to(device, non_blocking=True),
            size,
            mask_noise(0, i, 0, 0, (batch.images.shape[0], (size // cfg.model.patch_size) ** 2), device),
        )
    sync(device)
    seconds = time.perf_counter() - t0
    return steps * cfg.train.batch_size / seconds, wait / seconds


def format_row(r: Row) -> str:
    mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
    e2e = f"{r.e2e_img_s:,.0f} ({100 * r.e2e_data_wait:.0f}% wait)" if r.e2e_img_s is not None else "-"
    return (
        f"| {r.model} | {r.batch} | {r.size} | {r.step_img_s:,.0f} | {r.step_ms:.1f} | {r.flops_per_image / 1e9:.1f} | "
        f"{100 * r.mfu:.1f}% | {mem} | {e2e} |"
    )


TABLE_HEAD = (
    "| model | batch | B | step img/s | step ms | GFLOP/img | MFU | peak GiB | end-to-end img/s |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main(argv=None) -> dict:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        default=str(REPO / "configs/pretrain/mae_vit-base-p16_baseline_800e_imagenet.yaml"),
        help="recipe giving the decoder, patch, crop size, precision and pipeline",
    )
    parser.add_argument("--rows", default=None, help=f"model:batch:sizes ... (GPU default '{GPU_ROWS}')")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--compile", default="default", help="train.compile mode (none | default | reduce-overhead | ...)"
    )
    parser.add_argument(
        "--precision", default=None, help="bf16 | fp16 | fp32 (default: the recipe's; fp32 under --smoke)"
    )
    parser.add_argument(
        "--data", default=None, help="ImageFolder for end-to-end figures (its train/ split when present)"
    )
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument(
        "--pipeline", default=None, help="data.pipeline for end-to-end: loader | memory | device_decode"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="MFU denominator in TFLOP/s (default: a matmul measured here in the run's compute dtype)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run on any device: micro model, few steps, eager fp32 (the only option that shrinks)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON output (default: benchmarks/results/throughput_<device>.json)"
    )
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    overrides = [f"train.compile={args.compile}"]
    if args.smoke:
        overrides = [
            "model.patch_size=8",
            "data.crop_size=48",
            "model.decoder_embed_dim=32",
            "model.decoder_depth=1",
            "model.decoder_num_heads=2",
            "train.compile=none",
            "train.precision=fp32",
        ]
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    if args.pipeline:
        overrides.append(f"data.pipeline={args.pipeline}")
    data_root = args.data  # its train/ split when present (mae_et.data.sources.data_dir)
    # the recipe's model and step, never its monitors (this script runs none); data only when --data is given
    data = [f"data.root={args.data}", "data.source=imagefolder"] if args.data else []
    cfg = row_config(args.config, *data, *NO_MONITORS, *overrides, reads_data=bool(args.data))
    rows_spec = parse_rows(args.rows or (SMOKE_ROWS if args.smoke else GPU_ROWS))
    if not cuda and not args.smoke and args.rows is None:
        print("no CUDA: measuring the GPU rows on the CPU as asked (slow); --rows or --smoke for less")

    name = device_name()
    print(f"device: {name}; torch {torch.__version__}; precision {cfg.train.precision}; compile {cfg.train.compile}")
    peak_dtype = COMPUTE_DTYPES[cfg.train.precision]
    if args.peak_tflops is None:
        device = torch.device("cuda" if cuda else "cpu")
        args.peak_tflops = matmul_tflops(device, 8192 if cuda else (256 if args.smoke else 1024), peak_dtype)
        print(f"MFU against a {str(peak_dtype)[6:]} matmul measured here: {args.peak_tflops:.4g} TFLOP/s")
    print(TABLE_HEAD)
    rows = []
    for model_size, batch, sizes in rows_spec:
        rows += bench_row(cfg, model_size, batch, sizes, args.steps, args.warmup, args.peak_tflops, data_root)
    # the curriculum's promise: how much faster each smaller B steps than full size, for the same model and batch
    for r in rows:
        full = next(
            (x for x in rows if x.model == r.model and x.batch == r.batch and x.size == cfg.data.crop_size), None
        )
        if full is not None:
            print(f"{r.model} B={r.size}: {r.step_img_s / full.step_img_s:.2f}x the full-size step")
    result = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "precision": cfg.train.precision,
        "compile": cfg.train.compile,
        "pipeline": cfg.data.pipeline if data_root else None,
        "peak_tflops": args.peak_tflops,
        "peak_dtype": str(peak_dtype)[6:],
        "steps": args.steps,
        "rows": [asdict(r) for r in rows],
    }
    out = (
        Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"throughput_{'cuda' if cuda else 'cpu'}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_user_command(main)
