"""One bounded speed check of the whole project, for whoever holds a GPU: every figure in one process.

Run it FIRST, in ONE call of the device tool (`run`), from the repository root:

    command:   set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; nvidia-smi > $OUT/nvidia-smi.txt 2>&1;
               python3 benchmarks/gpu_check.py --data .data/imagenette-travel --out $OUT 2>&1 | tee $OUT/gpu_check.log
    carry:     [".data/imagenette-travel"]   (32 MB: 2,560 train + 500 val 224-px Imagenette JPEGs)
    timeout_s: 570

It takes about 8 minutes on one H200 (plus the machine's start): it watches its own clock from its first
line (`--budget-s`, default 480, imports included), skips, saying why, whatever no longer fits, and stops
an item that overruns its share (SIGALRM). No network, no wandb; without `--data` it writes its own JPEGs
into a temporary folder. After every row it rewrites `gpu_check.json` (device, versions, date, every row,
every skip and failure with its reason, the targets) and `gpu_check.md` (the same as tables) under
`--out`, so a run stopped at the tool's limit still returns what it measured. The Markdown is printed last.

Sections, in order of value (each estimates its cost from what was already measured and is skipped
when it would not fit, keeping a reserve for the sections after it):

  env   device, torch, transformers; the bf16 matmul rate (8192^3, random data): the MFU denominator
  a+b   train step img/s with the input already on the device, batch 256, bf16 autocast via Accelerate,
        fused AdamW: ours (`mae_et.train.step.TrainStep`, what the training loop runs) and Hugging Face's
        `ViTMAEForPreTraining` (sdpa, `interpolate_pos_encoding=True` below 224) for ViT-B/16 at
        B = 224/192/160/128/96 and ViT-L/16 batch 128 at 224, eager; ours decoding a quarter of the patches
        (`model.decode_fraction=0.25`, same weights: impl ours_partial) at ViT-B B = 224 and 96, eager; then
        ours under `torch.compile` (the partial step at 224 second), sizes in order of value, compile seconds
        reported apart, within `--compile-cap-s`.
        Peak memory (the row's own: weights, optimizer state, activations) and MFU (`mae_et.models.flops`).
  c     end to end: img/s and data-wait fraction through data.pipeline=memory, device_decode and tar shards at
        B = 224 and 96 (the fastest step measured at that B), beside that step's figure
  hog   the HOG target (model.target=hog, its own model: the head differs): ViT-B b256 eager step at B = 224 and
        96 beside the pixel step of section a, and the target alone on a batch at that B (target <= 5% of the step)
  d     the fractal renderer, batched on the device
  e     training probe: plain MAE and the EfficientTrain curriculum (`et`) for the same images on the
        data, eager: both losses, whether they fall, and the wall-time ratio et / baseline

Targets it reports (never asserts): ViT-B/16 step at 224 >= 2.0x HF in the same run; B=160 / 96
>= 1.8x / 3.5x our own 224 figure; ViT-L/16 batch 128 at 224 >= 2,600 img/s; end to end >= 90% of
the step figure at that B; ViT-B batch 256 peak memory at 224 <= 14.4 GiB; the HOG target <= 5% of its step.

The test suite runs the same code on the CPU in seconds (CUDA-only parts say so in the JSON):

    python benchmarks/gpu_check.py --dry-run --data ../shared/data/imagenette-mini --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import importlib.metadata
import itertools
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

T0 = time.perf_counter()  # the budget counts from here: the heavy imports (torch, transformers) included

import torch  # noqa: E402

if not __package__:  # run as `python benchmarks/gpu_check.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import REPO  # noqa: E402
from benchmarks.fractal_speed import rate  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    COMPUTE_DTYPES,
    count_params,
    device_name,
    end_to_end,
    fresh_accelerator,
    hf_peer_config,
    matmul_tflops,
    step_flops,
    time_calls,
)
from mae_et.cli import OneLineParser, run_user_command  # noqa: E402
from mae_et.curriculum.schedules import plan_curriculum  # noqa: E402
from mae_et.data.folder import scan_image_folder  # noqa: E402
from mae_et.data.fractal import FractalDataset, render_fractal_batch  # noqa: E402
from mae_et.data.shards import write_shards  # noqa: E402
from mae_et.data.sources import data_dir, open_source  # noqa: E402
from mae_et.models.mae import MODEL_SIZES  # noqa: E402
from mae_et.train.config import curriculum_stages, load_pretrain_config  # noqa: E402
from mae_et.train.optim import build_adamw  # noqa: E402
from mae_et.train.pretrain import mask_noise, pretrain  # noqa: E402
from mae_et.train.run import fresh_accelerate_state  # noqa: E402
from mae_et.train.step import TrainStep, build_training, train_step_of  # noqa: E402

TRAVEL_DATA = REPO / ".data" / "imagenette-travel"


@dataclass(frozen=True)
class Plan:
    """What one run measures. GPU: the figures the project set out to beat (H100 reference, BENCHMARKS.md); dry run: the
    same branches, tiny."""

    config: str  # recipe: decoder, patch, crop, precision
    models: tuple[
        tuple[str, int, tuple[int, ...]], ...
    ]  # (model size, batch, input sizes B); the first is the main one
    steps: int  # timed steps per step row
    warmup: int  # untimed steps before them (the first compiles)
    compile_order: tuple[tuple, ...]  # (index into models, B[, "partial"]): compiled rows in order of value
    compile_guess_s: float  # cost of one compile before any was measured
    e2e_sizes: tuple[int, ...]
    e2e_steps: int
    num_workers: int
    fractal_sizes: tuple[int, ...]
    fractal_batch: int
    fractal_seconds: float
    probe_batch: int
    probe_epochs: float
    matmul_n: int
    reserve_s: dict = field(default_factory=dict)  # guessed cost of each late section, kept free for it
    compile_backend: str = "inductor"
    extra_overrides: tuple[str, ...] = ()
    partial_fraction: float = 0.25  # model.decode_fraction of the partial rows (CrossMAE's kept mask ratio)
    partial_sizes: tuple[int, ...] = ()  # B of the main model's eager partial rows
    hog_sizes: tuple[int, ...] = ()  # B of the main model's eager HOG-target rows


GPU_PLAN = Plan(
    config=str(REPO / "configs/pretrain/mae_vit-base-p16_baseline_800e_imagenet.yaml"),
    models=(("base", 256, (224, 192, 160, 128, 96)), ("large", 128, (224,))),
    steps=20,
    warmup=5,
    compile_order=((0, 224), (0, 224, "partial"), (0, 96), (0, 160), (1, 224), (0, 192), (0, 128)),
    compile_guess_s=90.0,
    e2e_sizes=(224, 96),
    e2e_steps=20,
    num_workers=8,
    fractal_sizes=(64, 224),
    fractal_batch=256,
    fractal_seconds=2.0,
    probe_batch=256,
    probe_epochs=6.0,
    matmul_n=8192,
    reserve_s={"e2e": 45.0, "hog": 20.0, "fractal": 10.0, "probe": 75.0},
    partial_sizes=(224, 96),
    hog_sizes=(224, 96),
)

# The same branches on a CPU in seconds: the micro recipe (patch 8, 48-px crops, fp32), a second
# "model" row standing in for ViT-L, compiled rows through dynamo's eager backend (no C++ build).
DRY_PLAN = Plan(
    config=str(REPO / "configs/pretrain/mae_vit-micro-p8_et_cpu-test.yaml"),
    models=(("micro", 8, (48, 32)), ("micro", 4, (48,))),
    steps=2,
    warmup=1,
    compile_order=((0, 48), (0, 48, "partial"), (0, 32)),
    compile_guess_s=20.0,
    e2e_sizes=(48, 32),
    e2e_steps=2,
    num_workers=0,
    fractal_sizes=(32,),
    fractal_batch=4,
    fractal_seconds=0.2,
    probe_batch=16,
    probe_epochs=1.0,
    matmul_n=256,
    reserve_s={"e2e": 5.0, "hog": 2.0, "fractal": 1.0, "probe": 10.0},
    compile_backend="eager",
    extra_overrides=("curriculum.schedule=none",),
    partial_sizes=(48,),
    hog_sizes=(48,),
)


# ----------------------------------------------------------------------------- the clock and the report


class OutOfTime(BaseException):
    """Raised (by SIGALRM) inside an item that ran past its limit. BaseException: no `except Exception` swallows it."""


class Report:
    """Every row, skip and failure of the run, rewritten to JSON and Markdown after each change."""

    def __init__(self, out: Path, budget_s: float, header: dict, t0: float | None = None) -> None:
        self.out = out
        self.t0 = time.perf_counter() if t0 is None else t0
        self.budget_s = budget_s
        self.data = {
            **header,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "step": [],
            "ratios": [],
            "size_speedups": [],
            "e2e": [],
            "hog": [],
            "fractal": [],
            "probe": None,
            "skipped": [],
            "failed": [],
            "targets": [],
        }
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, section: str, item: str, estimate_s: float, reserve_s: float = 0.0) -> bool:
        """True when `estimate_s` fits in what is left after `reserve_s` (kept for later sections); else a skip."""
        if estimate_s <= self.left() - reserve_s:
            return True
        self.skip(
            section,
            item,
            f"needs about {estimate_s:.0f} s; {max(self.left(), 0):.0f} s of the "
            f"{self.budget_s:.0f} s budget left, {reserve_s:.0f} s of it kept for later sections",
        )
        return False

    @contextmanager
    def guard(self, section: str, item: str, limit_s: float | None = None):
        """Run one item: an error is recorded and the run goes on; past `limit_s` (default: what is left of
        the budget) it is stopped by SIGALRM and recorded as failed, so the run ends near its budget."""
        limit = max(self.left() if limit_s is None else min(limit_s, self.left()), 1.0)
        armed = {"on": True}

        def on_alarm(signum, frame):
            if armed["on"]:
                raise OutOfTime(f"stopped after {limit:.0f} s: past its share of the {self.budget_s:.0f} s budget")

        use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if use_alarm:
            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        except (Exception, OutOfTime) as e:  # noqa: BLE001 - one item's failure must not cost the others
            self.fail(section, item, e)
            free_memory()
        finally:
            armed["on"] = False
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    def skip(self, section: str, item: str, reason: str) -> None:
        print(f"SKIP {section} {item}: {reason}", flush=True)
        self.data["skipped"].append({"section": section, "item": item, "reason": reason})
        self.save()

    def fail(self, section: str, item: str, error: BaseException) -> None:
        print(f"FAILED {section} {item}: {type(error).__name__}: {error}", flush=True)
        if not isinstance(error, OutOfTime):
            traceback.print_exc()
        self.data["failed"].append(
            {"section": section, "item": item, "error": f"{type(error).__name__}: {error}"[:2000]}
        )
        self.save()

    def add(self, section: str, row) -> None:
        if isinstance(self.data[section], list):
            self.data[section].append(row)
        else:
            self.data[section] = row
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def owned_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the weights and optimizer state of one model: subtracted from what else is on the device."""
    tensors = list(model.parameters()) + [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


# ----------------------------------------------------------------------------- env


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    try:
        import transformers  # noqa: F401 - importable, not only installed

        hf = package_version("transformers")
    except ImportError:
        hf = None
    cuda = torch.cuda.is_available()
    env = {
        "device": device_name(),
        "torch": torch.__version__,
        "transformers": hf,
        "cuda": cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        **{name: package_version(name) for name in ("timm", "accelerate", "torchvision")},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            cuda_version=torch.version.cuda,
        )
    return env


# ----------------------------------------------------------------------------- sections a + b: step rows


@dataclass
class OurModel:
    """Our model and optimizer for one (size, batch), with an eager step and, once asked for, a compiled one."""

    size: str
    batch: int
    sizes: tuple[int, ...]
    cfg: object
    eager: TrainStep
    compiled: TrainStep | None = None
    partial: dict = field(default_factory=dict)  # compile mode -> TrainStep decoding a share (same weights)

    def compiled_step(self, accelerator, mode: str, backend: str) -> TrainStep:
        if self.compiled is None:  # same weights and optimizer: only the forward is wrapped
            self.compiled = train_step_of(
                self.cfg, accelerator, self.eager.model, self.eager.optimizer, self.sizes, mode, backend
            )
        return self.compiled

    def partial_step(self, accelerator, cfg, mode: str, backend: str) -> TrainStep:
        """The same weights and optimizer, the decoder on the visible + cfg.model.decode_fraction of the patches."""
        if mode not in self.partial:
            self.partial[mode] = train_step_of(
                cfg, accelerator, self.eager.model, self.eager.optimizer, self.sizes, mode, backend
            )
        return self.partial[mode]


class StepBench:
    """Step rows: ours eager, the HF peer, ours compiled; one Accelerator (the run's precision) for all."""

    def __init__(self, report: Report, plan: Plan, args, base_overrides: list[str]) -> None:
        self.report, self.plan, self.args = report, plan, args
        self.base_overrides = base_overrides
        precision = load_pretrain_config(plan.config, base_overrides).train.precision
        self.accelerator = fresh_accelerator(precision)
        self.device = self.accelerator.device
        self.peak_tflops = args.peak_tflops or report.data["matmul_tflops"]
        self.ours: dict[int, OurModel] = {}
        self.compile_spent = 0.0
        self.left_out: set[int] = set()  # model indices the caller skipped

    # -- helpers

    def cfg_for(self, model_size: str, batch: int, partial: bool = False, hog: bool = False):
        share = [f"model.decode_fraction={self.plan.partial_fraction}"] if partial else []
        target = ["model.target=hog", "model.norm_pix_loss=false"] if hog else []
        return load_pretrain_config(
            self.plan.config,
            [*self.base_overrides, f"model.size={model_size}", f"train.batch_size={batch}", *share, *target],
        )

    def estimate_s(self, model_size: str, batch: int, size: int, cfg, build: bool) -> float:
        """Seconds for one step row: FLOPs at the lowest MFU seen so far (10% before any), plus a model build."""
        mfus = [r["mfu"] for r in self.report.data["step"] if r["mfu"] > 0]
        mfu = min(mfus) if mfus else 0.10
        per_step = batch * step_flops(cfg, model_size, size) / (self.peak_tflops * 1e12 * mfu)
        params = 12 * MODEL_SIZES[model_size]["depth"] * MODEL_SIZES[model_size]["embed_dim"] ** 2
        return (self.plan.steps + self.plan.warmup) * per_step + (2.0 + 3e-8 * params if build else 0.0)

    def compile_estimate_s(self, model_size: str) -> float:
        """Seconds to compile one graph: the slowest per block so far (dynamo unrolls the blocks), else the guess."""
        depth = MODEL_SIZES[model_size]["depth"]
        per_block = [
            r["compile_s"] / MODEL_SIZES[r["model"]]["depth"] for r in self.report.data["step"] if "compile_s" in r
        ]
        main_depth = MODEL_SIZES[self.plan.models[0][0]]["depth"]
        return depth * (max(per_block) if per_block else self.plan.compile_guess_s / main_depth)

    def later_reserve(self) -> float:
        return sum(self.plan.reserve_s.values())

    def record(
        self,
        impl: str,
        model_size: str,
        batch: int,
        size: int,
        compile_mode: str,
        timing,
        cfg,
        params: int,
        extra: dict | None = None,
    ) -> dict:
        img_s = batch / timing.seconds_per_step
        flops = step_flops(cfg, model_size, size)
        row = {
            "impl": impl,
            "model": model_size,
            "batch": batch,
            "size": size,
            "compile": compile_mode,
            "img_s": img_s,
            "step_ms": 1000 * timing.seconds_per_step,
            "gflop_per_image": flops / 1e9,
            "mfu": flops * img_s / (self.peak_tflops * 1e12),
            "peak_mem_gib": timing.peak_mem_gib,
            "first_call_s": timing.first_call_s,
            "params": params,
            **(extra or {}),
        }
        self.report.add("step", row)
        print(format_step_row(row), flush=True)
        return row

    # -- ours

    def build_ours(self, index: int) -> OurModel:
        model_size, batch, sizes = self.plan.models[index]
        cfg = self.cfg_for(model_size, batch)
        _, _, eager = build_training(cfg, self.accelerator, 1e-4, tuple(sizes), compile_mode="none")
        self.ours[index] = OurModel(model_size, batch, tuple(sizes), cfg, eager)
        return self.ours[index]

    def time_ours(self, ours: OurModel, size: int, step: TrainStep, compile_mode: str, partial_cfg=None) -> dict:
        """One row of ours; with partial_cfg, the partial step (impl "ours_partial", its FLOPs at its share)."""
        crop = ours.cfg.data.crop_size
        images = torch.randint(
            0, 256, (ours.batch, 3, crop, crop), dtype=torch.uint8, device=self.device
        )  # (n, 3, S, S)
        noise = mask_noise(0, 0, 0, 0, (ours.batch, (size // ours.cfg.model.patch_size) ** 2), self.device)  # (n, L)
        others = allocated() - owned_bytes(step.model, step.optimizer)
        timing = time_calls(lambda: step(images, size, noise), self.plan.steps, self.plan.warmup, self.device, others)
        extra = {}
        if compile_mode != "none":
            # the first call compiles this size's graph and runs one step
            extra["compile_s"] = max(timing.first_call_s - timing.seconds_per_step, 0.0)
        if partial_cfg is not None:
            extra["decode_fraction"] = partial_cfg.model.decode_fraction
        return self.record(
            "ours" if partial_cfg is None else "ours_partial",
            ours.size,
            ours.batch,
            size,
            compile_mode,
            timing,
            ours.cfg if partial_cfg is None else partial_cfg,
            count_params(step.model),
            extra,
        )

    def partial_eager(self, index: int) -> None:
        """Ours decoding a share of the patches (model.decode_fraction), eager, at the plan's partial sizes."""
        model_size, batch, _ = self.plan.models[index]
        cfg = self.cfg_for(model_size, batch, partial=True)
        for size in self.plan.partial_sizes:
            item = f"ours_partial {model_size} b{batch} B={size} eager"
            if not self.report.fits(
                "step", item, self.estimate_s(model_size, batch, size, cfg, index not in self.ours)
            ):
                continue
            with self.report.guard("step", item):
                ours = self.ours.get(index) or self.build_ours(index)
                self.time_ours(
                    ours, size, ours.partial_step(self.accelerator, cfg, "none", self.plan.compile_backend), "none", cfg
                )

    def ours_eager(self, index: int) -> None:
        model_size, batch, sizes = self.plan.models[index]
        for k, size in enumerate(sizes):
            item = f"ours {model_size} b{batch} B={size} eager"
            cfg = self.cfg_for(model_size, batch)
            if not self.report.fits("step", item, self.estimate_s(model_size, batch, size, cfg, k == 0)):
                continue
            with self.report.guard("step", item):
                ours = self.ours.get(index) or self.build_ours(index)
                self.time_ours(ours, size, ours.eager, "none")

    # -- the Hugging Face peer

    def hf(self, index: int) -> None:
        model_size, batch, sizes = self.plan.models[index]
        try:
            import transformers  # noqa: F401
        except ImportError:
            for size in sizes:
                self.report.skip(
                    "step",
                    f"hf {model_size} b{batch} B={size}",
                    "transformers is not installed (pip install -e '.[bench]')",
                )
            return
        cfg = self.cfg_for(model_size, batch)
        peer: list = []  # [model, optimizer] once built
        for k, size in enumerate(sizes):
            item = f"hf {model_size} b{batch} B={size} eager"
            if not self.report.fits("step", item, self.estimate_s(model_size, batch, size, cfg, k == 0)):
                continue
            with self.report.guard("step", item):
                peer = peer or list(self.build_hf(cfg, model_size))
                self.time_hf(*peer, cfg, model_size, batch, size)
        del peer
        free_memory()

    def build_hf(self, cfg, model_size: str):
        import transformers

        model = transformers.ViTMAEForPreTraining(hf_peer_config(cfg, model_size))
        optimizer = build_adamw(model, 1e-4, cfg.optim.weight_decay, cfg.optim.betas)  # fused AdamW, as ours
        model, optimizer = self.accelerator.prepare(model, optimizer)  # the same bf16 autocast as ours
        model.train()
        return model, optimizer

    def time_hf(self, model, optimizer, cfg, model_size: str, batch: int, size: int) -> dict:
        accelerator = self.accelerator
        pixels = torch.randn(batch, 3, size, size, device=self.device)  # (n, 3, B, B) normalised input
        interpolate = size != cfg.data.crop_size

        def run() -> None:
            out = model(pixel_values=pixels, interpolate_pos_encoding=interpolate)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        others = allocated() - owned_bytes(model, optimizer)
        timing = time_calls(run, self.plan.steps, self.plan.warmup, self.device, others)
        attn = getattr(accelerator.unwrap_model(model).config, "_attn_implementation", None)
        return self.record(
            "hf",
            model_size,
            batch,
            size,
            "none",
            timing,
            cfg,
            count_params(model),
            {"attn_implementation": attn, "interpolate_pos_encoding": interpolate},
        )

    # -- ours compiled

    def compiled(self, mode: str) -> None:
        stopped = False
        for index, size, *kind in self.plan.compile_order:
            if index in self.left_out:
                continue
            partial = kind == ["partial"]
            model_size, batch, _ = self.plan.models[index]
            item = f"ours{'_partial' if partial else ''} {model_size} b{batch} B={size} compile={mode}"
            compile_est = self.compile_estimate_s(model_size)
            cfg = self.cfg_for(model_size, batch)
            if stopped:
                self.report.skip("step", item, "an earlier compiled row was stopped at its limit")
                continue
            if self.compile_spent + compile_est > self.args.compile_cap_s:
                self.report.skip(
                    "step",
                    item,
                    f"compile cap: {self.compile_spent:.0f} s spent + about {compile_est:.0f} s "
                    f"for this graph > --compile-cap-s {self.args.compile_cap_s:.0f}",
                )
                continue
            estimate = compile_est + self.estimate_s(model_size, batch, size, cfg, index not in self.ours)
            if not self.report.fits("step", item, estimate, self.later_reserve()):
                continue
            t0, failures = time.perf_counter(), len(self.report.data["failed"])
            # the row may run to the compile cap, never into the later sections' reserve
            limit = min(self.args.compile_cap_s - self.compile_spent, self.report.left() - self.later_reserve())
            with self.report.guard("step", item, limit):
                ours = self.ours.get(index) or self.build_ours(index)
                if partial:
                    pcfg = self.cfg_for(model_size, batch, partial=True)
                    self.time_ours(
                        ours,
                        size,
                        ours.partial_step(self.accelerator, pcfg, mode, self.plan.compile_backend),
                        mode,
                        pcfg,
                    )
                else:
                    self.time_ours(
                        ours, size, ours.compiled_step(self.accelerator, mode, self.plan.compile_backend), mode
                    )
            self.compile_spent += time.perf_counter() - t0
            stopped = (
                len(self.report.data["failed"]) > failures and "OutOfTime" in self.report.data["failed"][-1]["error"]
            )

    def drop(self, index: int) -> None:
        self.ours.pop(index, None)
        free_memory()


def step_ratios(report: Report, crop: int) -> None:
    """ours / HF at each (model, batch, B), eager and compiled; each B against our own full-size figure."""
    rows = report.data["step"]
    report.data["ratios"], report.data["size_speedups"] = [], []
    for hf in (r for r in rows if r["impl"] == "hf"):
        key = {k: hf[k] for k in ("model", "batch", "size")}
        ratio = dict(key, hf_img_s=hf["img_s"])
        for r in rows:  # ours_<compile>_over_hf, ours_partial_<compile>_over_hf (HF decodes every masked patch)
            if r["impl"] in ("ours", "ours_partial") and all(r[k] == v for k, v in key.items()):
                ratio[f"{r['impl']}_{r['compile']}_img_s"] = r["img_s"]
                ratio[f"{r['impl']}_{r['compile']}_over_hf"] = r["img_s"] / hf["img_s"]
        report.data["ratios"].append(ratio)
    for r in rows:
        full = next(
            (
                x
                for x in rows
                if x["impl"] == r["impl"]
                and x["model"] == r["model"]
                and x["batch"] == r["batch"]
                and x["compile"] == r["compile"]
                and x["size"] == crop
            ),
            None,
        )
        if full is not None and r["size"] != crop:
            report.data["size_speedups"].append(
                {
                    "impl": r["impl"],
                    "model": r["model"],
                    "batch": r["batch"],
                    "compile": r["compile"],
                    "size": r["size"],
                    "over_full_size": r["img_s"] / full["img_s"],
                }
            )
    report.save()


# ----------------------------------------------------------------------------- section c: end to end


def best_step(report: Report, ours: OurModel, size: int) -> tuple[TrainStep, dict | None]:
    """The fastest of our measured steps at this B (compiled when that row ran)."""
    rows = [
        r
        for r in report.data["step"]
        if r["impl"] == "ours" and r["model"] == ours.size and r["batch"] == ours.batch and r["size"] == size
    ]
    best = max(rows, key=lambda r: r["img_s"], default=None)
    if best is not None and best["compile"] != "none" and ours.compiled is not None:
        return ours.compiled, best
    return ours.eager, next((r for r in rows if r["compile"] == "none"), None)


def end_to_end_rows(report: Report, plan: Plan, bench: StepBench, data_root: Path) -> None:
    ours = bench.ours.get(0)
    if ours is None:
        report.skip("e2e", "all", "the main model's step rows did not run")
        return
    reserve = plan.reserve_s["hog"] + plan.reserve_s["fractal"] + plan.reserve_s["probe"]
    # the shard source (issue 22): the same images written as tar shards here, read by the loader's workers
    folder = data_root / "train" if (data_root / "train").is_dir() else data_root
    shard_dir = Path(tempfile.mkdtemp(prefix="gpu_check_shards_"))
    write_shards(folder, shard_dir / "set", shard_size=500)
    sources = {
        "memory": [f"data.root={data_root}", "data.pipeline=memory"],
        "device_decode": [f"data.root={data_root}", "data.pipeline=device_decode"],
        "shards": [f"data.root={shard_dir / 'set'}", "data.source=shards", "data.pipeline=loader",
                   f"data.shard_cache={shard_dir / 'cache'}", "tracking.knn_every_epochs=0"],
    }  # fmt: skip
    for pipeline, data_overrides in sources.items():
        cfg = load_pretrain_config(
            plan.config,
            [
                *bench.base_overrides,
                f"model.size={ours.size}",
                f"train.batch_size={ours.batch}",
                *data_overrides,
                f"data.num_workers={plan.num_workers}",
            ],
        )
        if report.fits("e2e", pipeline, plan.reserve_s["e2e"] / 3, reserve):
            with report.guard("e2e", pipeline, report.left() - reserve):
                e2e_pipeline(report, plan, cfg, ours, bench.device)
            free_memory()


def e2e_pipeline(report: Report, plan: Plan, cfg, ours: OurModel, device: torch.device) -> None:
    """Real JPEGs through cfg.data.pipeline (or the shard source) into our fastest step at each B: img/s, data-wait
    share, x the step."""
    name = "shards" if cfg.data.source == "shards" else cfg.data.pipeline
    t0 = time.perf_counter()
    data = open_source(
        cfg.data, cfg.train.seed, main=True, device=device
    )  # memory: every image decoded once, here (open_s)
    open_s = time.perf_counter() - t0
    for size in plan.e2e_sizes:
        step, step_row = best_step(report, ours, size)
        img_s, wait = end_to_end(cfg, data, step, size, plan.e2e_steps, plan.warmup, device)
        step_img_s = step_row["img_s"] if step_row else None
        report.add(
            "e2e",
            {
                "pipeline": name,
                "model": ours.size,
                "batch": ours.batch,
                "size": size,
                "compile": step.compile_mode,
                "img_s": img_s,
                "data_wait": wait,
                "open_s": open_s,
                "num_images": data.num_images,
                "num_workers": cfg.data.num_workers,
                "step_img_s": step_img_s,
                "fraction_of_step": img_s / step_img_s if step_img_s else None,
            },
        )
        print(
            f"e2e {name} B={size} ({step.compile_mode}): {img_s:,.0f} img/s, {100 * wait:.0f}% data wait"
            + (f", {100 * img_s / step_img_s:.0f}% of the step" if step_img_s else ""),
            flush=True,
        )


# ----------------------------------------------------------------------------- the HOG target


def hog_rows(report: Report, plan: Plan, bench: StepBench) -> None:
    """The HOG-target step (impl ours_hog, a model of its own: its head predicts HOG) beside section a's pixel step
    at the same B, and the HOG target alone on a (batch, 3, B, B) float batch: its share of the HOG step."""
    model_size, batch, _ = plan.models[0]
    cfg = bench.cfg_for(model_size, batch, hog=True)
    pixel = {
        r["size"]: r
        for r in report.data["step"]
        if r["impl"] == "ours" and r["compile"] == "none" and (r["model"], r["batch"]) == (model_size, batch)
    }
    reserve = plan.reserve_s["fractal"] + plan.reserve_s["probe"]
    step = None
    for size in plan.hog_sizes:
        item = f"ours_hog {model_size} b{batch} B={size} eager"
        if not report.fits("hog", item, 2 * bench.estimate_s(model_size, batch, size, cfg, step is None), reserve):
            continue
        with report.guard("hog", item, report.left() - reserve):
            if step is None:
                _, _, step = build_training(cfg, bench.accelerator, 1e-4, tuple(plan.hog_sizes), compile_mode="none")
            crop = cfg.data.crop_size
            images = torch.randint(
                0, 256, (batch, 3, crop, crop), dtype=torch.uint8, device=bench.device
            )  # (n, 3, S, S)
            noise = mask_noise(0, 0, 0, 0, (batch, (size // cfg.model.patch_size) ** 2), bench.device)  # (n, L)
            timing = time_calls(lambda: step(images, size, noise), plan.steps, plan.warmup, bench.device)
            row = bench.record("ours_hog", model_size, batch, size, "none", timing, cfg, count_params(step.model))
            hog = bench.accelerator.unwrap_model(step.model).hog
            pixels = torch.randn(batch, 3, size, size, device=bench.device)  # (n, 3, B, B): what the loss sees
            target = time_calls(lambda: hog(pixels), plan.steps, plan.warmup, bench.device)
            entry = {
                "model": model_size,
                "batch": batch,
                "size": size,
                "hog_step_ms": row["step_ms"],
                "hog_target_ms": 1000 * target.seconds_per_step,
                "target_share": target.seconds_per_step / timing.seconds_per_step,
                "pixel_step_ms": pixel[size]["step_ms"] if size in pixel else None,
            }
            entry["hog_over_pixel_step"] = (
                entry["hog_step_ms"] / entry["pixel_step_ms"] if entry["pixel_step_ms"] else None
            )
            report.add("hog", entry)
            print(
                f"hog B={size}: target {entry['hog_target_ms']:.2f} ms = {100 * entry['target_share']:.1f}% of the HOG "
                f"step ({entry['hog_step_ms']:.1f} ms)",
                flush=True,
            )
    step = None  # the HOG model's memory back before the next section
    free_memory()


# ----------------------------------------------------------------------------- section d: fractals


def fractal_rows(report: Report, plan: Plan, device: torch.device) -> None:
    for size in plan.fractal_sizes:
        if not report.fits("fractal", f"B={size}", 2 * plan.fractal_seconds + 1, plan.reserve_s["probe"]):
            continue
        with report.guard("fractal", f"B={size}", report.left() - plan.reserve_s["probe"]):
            data = FractalDataset(10, 1000, size, seed=0)
            systems = [data.system(i % 10) for i in range(plan.fractal_batch)]
            counter = itertools.count()
            img_s = rate(
                lambda: render_fractal_batch(systems, [next(counter) for _ in systems], size, device=device),
                plan.fractal_batch,
                plan.fractal_seconds,
                device,
            )  # one warm-up call, then timed calls
            report.add("fractal", {"size": size, "batch": plan.fractal_batch, "device": device.type, "img_s": img_s})
            print(f"fractal B={size} batch {plan.fractal_batch} on {device.type}: {img_s:,.0f} img/s", flush=True)


# ----------------------------------------------------------------------------- section e: training probe


def probe_overrides(
    plan: Plan, base_overrides: list[str], data_root: Path, out: Path, name: str, schedule: str
) -> list[str]:
    return [
        *base_overrides,
        f"data.root={data_root}",
        "data.pipeline=memory",
        f"data.num_workers={plan.num_workers}",
        f"train.batch_size={plan.probe_batch}",
        f"train.epochs={plan.probe_epochs}",
        "train.accum_steps=1",
        f"optim.warmup_epochs={plan.probe_epochs / 4}",
        "train.compile=none",
        f"curriculum.schedule={schedule}",
        f"output_dir={out}",
        f"name={name}",
        "tracking.wandb=off",
        "tracking.recon_every_epochs=0",
        "tracking.knn_every_epochs=0",
        "checkpoint.resume=false",
        f"checkpoint.every_steps={10**9}",
        "checkpoint.keep_last=1",
        "train.max_steps=null",
    ]


def planned_flops_ratio(cfg) -> float:
    """FLOPs of the run's curriculum over the same steps at full size (what the wall ratio should approach)."""
    images = len(scan_image_folder(data_dir(cfg.data)).samples)
    stages, budget = curriculum_stages(cfg)
    plan = plan_curriculum(stages, budget, cfg.train.epochs, images // cfg.train.batch_size, cfg.data.crop_size)
    full = step_flops(cfg, cfg.model.size, cfg.data.crop_size)
    spent = sum(st.num_steps * step_flops(cfg, cfg.model.size, st.size) for st in plan.stages)
    return spent / (plan.total_steps * full)


def probe_run(plan: Plan, base_overrides: list[str], data_root: Path, tmp: Path, name: str, schedule: str) -> dict:
    overrides = probe_overrides(plan, base_overrides, data_root, tmp, name, schedule)
    cfg = load_pretrain_config(plan.config, overrides)
    steps_per_epoch = len(scan_image_folder(data_dir(cfg.data)).samples) // cfg.train.batch_size
    cfg.train.log_every = max(1, round(plan.probe_epochs * steps_per_epoch / 10))  # about ten points per curve
    fresh_accelerate_state()
    result = pretrain(cfg)
    fresh_accelerate_state()
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-1]
    train_s = last["elapsed_s"] - last["overhead_s"]  # the loop, less the final checkpoint's bookkeeping
    return {
        "schedule": schedule,
        "steps": result.step,
        "images": result.step * cfg.train.batch_size,
        "model": cfg.model.size,
        "batch": cfg.train.batch_size,
        "compile": cfg.train.compile,
        "train_s": train_s,
        "img_s": result.step * cfg.train.batch_size / train_s,
        "first_loss": lines[0]["loss"],
        "last_loss": last["loss"],
        "loss_falling": last["loss"] < lines[0]["loss"],
        "curve": [{"step": x["step"], "size": x["size"], "loss": x["loss"]} for x in lines],
        "planned_flops_ratio": planned_flops_ratio(cfg),
    }


def probe(report: Report, plan: Plan, base_overrides: list[str], data_root: Path) -> None:
    if not report.fits("probe", "baseline + et", plan.reserve_s["probe"]):
        return
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_probe_") as tmp:
        for name, schedule in (("baseline", "none"), ("et", "et")):
            with report.guard("probe", name):
                runs[name] = r = probe_run(plan, base_overrides, data_root, Path(tmp), f"probe_{name}", schedule)
                print(
                    f"probe {name}: {r['steps']} steps, {r['train_s']:.1f} s, loss {r['first_loss']:.4f} -> "
                    f"{r['last_loss']:.4f}",
                    flush=True,
                )
            fresh_accelerate_state()
            free_memory()
    entry = {"runs": runs}
    if len(runs) == 2:
        entry["wall_ratio"] = runs["et"]["train_s"] / runs["baseline"]["train_s"]
        entry["planned_flops_ratio"] = runs["et"]["planned_flops_ratio"]
        print(
            f"probe: et / baseline wall time {entry['wall_ratio']:.3f} (FLOPs ratio {entry['planned_flops_ratio']:.3f})"
        )
    report.add("probe", entry)


# ----------------------------------------------------------------------------- data without --data


def make_jpeg_folder(root: Path, per_class: int, side: int = 224) -> Path:
    """An ImageFolder of smooth random JPEGs (2 classes under train/), made on the spot."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for label in range(2):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = torch.randint(0, 256, (3, 8, 8), generator=gen, dtype=torch.uint8)  # (3, 8, 8)
            big = torch.nn.functional.interpolate(low[None].float(), size=(side, side), mode="bilinear")[0]  # (3, s, s)
            pixels = big.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # (s, s, 3)
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


# ----------------------------------------------------------------------------- targets and the Markdown


def targets(data: dict, plan: Plan, crop: int) -> list[dict]:
    """The issue's targets against what was measured (never asserted). The thresholds are for the H200."""
    main_size, main_batch, _ = plan.models[0]
    ours = {(r["model"], r["batch"], r["size"], r["compile"]): r for r in data["step"] if r["impl"] == "ours"}
    hf = {(r["model"], r["batch"], r["size"]): r for r in data["step"] if r["impl"] == "hf"}

    def best(model, batch, size):
        rows = [r for (m, b, s, _), r in ours.items() if (m, b, s) == (model, batch, size)]
        return max(rows, key=lambda r: r["img_s"], default=None)

    modes = sorted({mode for (_, _, _, mode) in ours})
    out = []

    def add(name, value, goal, met, note=""):
        out.append(
            {"target": name, "measured": value, "goal": goal, "met": met if value is not None else None, "note": note}
        )

    full = best(main_size, main_batch, crop)
    peer = hf.get((main_size, main_batch, crop))
    ratio = full["img_s"] / peer["img_s"] if full and peer else None
    add(
        f"{main_size} b{main_batch} B={crop}: ours / HF",
        ratio,
        ">= 2.0",
        ratio is not None and ratio >= 2.0,
        f"ours {full['compile']}" if full else "",
    )
    partial = max(
        (
            r
            for r in data["step"]
            if r["impl"] == "ours_partial" and (r["model"], r["batch"], r["size"]) == (main_size, main_batch, crop)
        ),
        key=lambda r: r["img_s"],
        default=None,
    )
    p_ratio = partial["img_s"] / peer["img_s"] if partial and peer else None
    add(
        f"{main_size} b{main_batch} B={crop}: ours partial ({plan.partial_fraction:g} decoded) / HF full",
        p_ratio,
        ">= 1.5 (the CPU target at ViT-S/16; none set for the GPU)",
        p_ratio is not None and p_ratio >= 1.5,
        f"ours {partial['compile']}" if partial else "",
    )
    for size, goal in ((round(crop * 160 / 224), 1.8), (round(crop * 96 / 224), 3.5)):
        for mode in modes:
            a, b = ours.get((main_size, main_batch, size, mode)), ours.get((main_size, main_batch, crop, mode))
            if a and b:
                v = a["img_s"] / b["img_s"]
                add(f"{main_size} B={size} / B={crop} (compile {mode})", v, f">= {goal}", v >= goal)
    if len(plan.models) > 1:
        l_size, l_batch, _ = plan.models[1]
        r = best(l_size, l_batch, crop)
        add(
            f"{l_size} b{l_batch} B={crop} img/s",
            r["img_s"] if r else None,
            ">= 2600",
            r is not None and r["img_s"] >= 2600,
        )
    for h in data["hog"]:
        add(
            f"{h['model']} b{h['batch']} B={h['size']}: HOG target / HOG step",
            h["target_share"],
            "<= 0.05",
            h["target_share"] <= 0.05,
        )
    for e in data["e2e"]:
        v = e["fraction_of_step"]
        add(f"end to end {e['pipeline']} B={e['size']} / step", v, ">= 0.90", v is not None and v >= 0.9)
    for mode in modes:
        r = ours.get((main_size, main_batch, crop, mode))
        if r:
            add(
                f"{main_size} b{main_batch} B={crop} peak GiB (compile {mode})",
                r["peak_mem_gib"],
                "<= 14.4",
                r["peak_mem_gib"] is not None and r["peak_mem_gib"] <= 14.4,
                "" if r["peak_mem_gib"] is not None else "CUDA only",
            )
    return out


def fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


STEP_HEAD = ("impl", "model", "batch", "B", "compile", "img/s", "ms/step", "GFLOP/img", "MFU", "peak GiB", "compile s")


def table(title: str, head: tuple[str, ...], rows: list[list]) -> list[str]:
    """A Markdown section: title, header, separator, one line per row (cells already formatted)."""
    lines = ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def step_cells(r: dict) -> list:
    return [
        r["impl"],
        r["model"],
        r["batch"],
        r["size"],
        r["compile"],
        fmt(r["img_s"]),
        f"{r['step_ms']:.1f}",
        f"{r['gflop_per_image']:.2f}",
        f"{100 * r['mfu']:.1f}%",
        fmt(r["peak_mem_gib"], ".2f"),
        fmt(r.get("compile_s"), ".0f"),
    ]


def format_step_row(r: dict) -> str:
    return "| " + " | ".join(str(c) for c in step_cells(r)) + " |"


def compiled_over_hf(r: dict, impl: str = "ours") -> float | None:
    return next(
        (
            v
            for k, v in r.items()
            if k.startswith(f"{impl}_")
            and k.endswith("_over_hf")
            and k != f"{impl}_none_over_hf"
            and (impl == "ours_partial" or not k.startswith("ours_partial_"))
        ),
        None,
    )


def markdown(d: dict) -> str:
    lines = [
        f"# gpu_check: {d['device']}",
        "",
        f"torch {d['torch']}, transformers {d['transformers'] or 'not installed'}, {d['date']}; "
        f"matmul {fmt(d.get('matmul_tflops'), '.4g')} TFLOP/s (MFU denominator {fmt(d.get('peak_tflops'), '.4g')}); "
        f"{d['elapsed_s']:.0f} s of a {d['budget_s']:.0f} s budget"
        + ("; DRY RUN (CPU, tiny)" if d.get("dry_run") else ""),
    ]
    lines += table("Train step (input on the device)", STEP_HEAD, [step_cells(r) for r in d["step"]])
    lines += table(
        "Ours / Hugging Face ViTMAE, same run",
        (
            "model",
            "batch",
            "B",
            "HF img/s",
            "ours eager / HF",
            "ours compiled / HF",
            "ours partial eager / HF",
            "ours partial compiled / HF",
        ),
        [
            [
                r["model"],
                r["batch"],
                r["size"],
                fmt(r["hf_img_s"]),
                fmt(r.get("ours_none_over_hf"), ".2f"),
                fmt(compiled_over_hf(r), ".2f"),
                fmt(r.get("ours_partial_none_over_hf"), ".2f"),
                fmt(compiled_over_hf(r, "ours_partial"), ".2f"),
            ]
            for r in d["ratios"]
        ],
    )
    lines += table(
        "Each B against the full size, same implementation",
        ("impl", "model", "compile", "B", "x full size"),
        [[r["impl"], r["model"], r["compile"], r["size"], f"{r['over_full_size']:.2f}"] for r in d["size_speedups"]],
    )
    lines += table(
        "End to end",
        ("pipeline", "B", "step", "img/s", "data wait", "x step"),
        [
            [
                r["pipeline"],
                r["size"],
                r["compile"],
                fmt(r["img_s"]),
                f"{100 * r['data_wait']:.0f}%",
                fmt(r["fraction_of_step"], ".2f"),
            ]
            for r in d["e2e"]
        ],
    )
    lines += table(
        "HOG target (model.target=hog), eager",
        ("model", "batch", "B", "HOG step ms", "target ms", "target / HOG step", "pixel step ms", "HOG / pixel step"),
        [
            [
                r["model"],
                r["batch"],
                r["size"],
                f"{r['hog_step_ms']:.1f}",
                f"{r['hog_target_ms']:.2f}",
                f"{100 * r['target_share']:.1f}%",
                fmt(r["pixel_step_ms"], ".1f"),
                fmt(r["hog_over_pixel_step"], ".3f"),
            ]
            for r in d.get("hog", [])
        ],
    )
    lines += table(
        "Fractal renderer, batched",
        ("B", "batch", "device", "img/s"),
        [[r["size"], r["batch"], r["device"], fmt(r["img_s"])] for r in d["fractal"]],
    )
    runs = d["probe"]["runs"] if d["probe"] else {}
    lines += table(
        "Training probe: baseline vs et, same images",
        ("run", "steps", "images", "train s", "img/s", "loss first -> last"),
        [
            [
                name,
                r["steps"],
                r["images"],
                f"{r['train_s']:.1f}",
                fmt(r["img_s"]),
                f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}",
            ]
            for name, r in runs.items()
        ],
    )
    if d["probe"] and "wall_ratio" in d["probe"]:
        lines += [
            "",
            f"et / baseline wall time: {d['probe']['wall_ratio']:.3f} "
            f"(FLOPs ratio of the schedule: {d['probe']['planned_flops_ratio']:.3f})",
        ]
    lines += table(
        "Targets (reported, not asserted)",
        ("target", "measured", "goal", "met"),
        [
            [t["target"], fmt(t["measured"], ",.2f"), t["goal"], f"{fmt(t['met'], '')} {t['note']}"]
            for t in d["targets"]
        ],
    )
    lines += ["", "## Skipped", ""] + [f"- {s['section']} {s['item']}: {s['reason']}" for s in d["skipped"]]
    lines += ["", "## Failed", ""] + [f"- {s['section']} {s['item']}: {s['error']}" for s in d["failed"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


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
    base_overrides = ["data.source=imagefolder", f"data.root={REPO}", *plan.extra_overrides]
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
    base_cfg = load_pretrain_config(plan.config, base_overrides)
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
        bench = StepBench(report, plan, args, base_overrides)
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
        section(report, args, "probe", lambda: probe(report, plan, base_overrides, data_root))

    report.data["targets"] = targets(report.data, plan, crop)
    report.save()
    print(markdown(report.data), flush=True)
    print(f"wrote {report.out / 'gpu_check.json'} and gpu_check.md in {report.elapsed():.0f} s")
    return report.data


if __name__ == "__main__":
    run_user_command(main)
