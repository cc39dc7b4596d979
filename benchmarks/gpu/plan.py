"""What one gpu_check run measures (`Plan`: the GPU's figures, or the same branches tiny for the CPU dry run) and
the environment it records."""

from __future__ import annotations

import datetime
import importlib.metadata
import sys
from dataclasses import dataclass, field

import torch

from benchmarks import REPO
from benchmarks.study.config import row_config
from benchmarks.throughput import device_name


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

    def row_config(self, *overrides: str, model: str | None = None, batch: int | None = None):
        """The config of one of this plan's rows: its recipe on the checkout's folder (a step row reads no image),
        then `overrides`, model size and batch."""
        return row_config(
            self.config,
            "data.source=imagefolder",
            f"data.root={REPO}",
            *self.extra_overrides,
            *overrides,
            model=model,
            batch=batch,
        )


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
