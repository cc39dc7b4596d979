"""Pretraining configuration: the recipe schema (model, data, curriculum, optim, train, checkpoint, tracking)
and its cross-field rules.

Loading (YAML + `_base_` + dotted overrides, typed building, one-line errors) is `mae_et.recipes`;
`validate_pretrain` checks what no single field can (sizes vs patch size, curriculum vs crop size, ...),
so every mistake fails in one line before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mae_et.curriculum import schedules as curriculum_lib
from mae_et.curriculum.frequency import FREQUENCY_MODES
from mae_et.recipes import ConfigError, build_config, load_yaml_recipe, merge_dicts, parse_overrides

# ----------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    size: str = "base"  # micro | tiny | small | base | large | huge
    patch_size: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    # sin-cos positions at a reduced input size B: grid (0..g-1, the reference: a location's code changes from
    # stage to stage) | extent (spread over the full crop's grid: fractional positions, as EfficientTrain's ViT)
    pos_embed: str = "grid"


@dataclass
class DataConfig:
    source: str = "imagefolder"  # imagefolder | fractal (generated, no files) | auto (fractal unless a root is given)
    root: Optional[str] = None  # an ImageFolder: class sub-folders of images
    split: str = "train"  # sub-folder of root to pretrain on when it exists; "" = root itself
    crop_size: int = 224  # RandomResizedCrop output side: the full curriculum size
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    strict: bool = False  # true: the first unreadable file is an error instead of a counted skip
    num_workers: int = 8
    pin_memory: bool = True
    # how images reach the model: loader (PIL decode + crop in workers: portable), memory (decode once,
    # keep uint8 images on the device, crop on the device), device_decode (JPEG decode + crop on the device)
    pipeline: str = "loader"
    memory_size: Optional[int] = None  # memory pipeline: stored side (default crop_size * 256/224)
    memory_on_device: bool = True  # memory pipeline: keep the store on the GPU (false: pinned CPU memory)
    fractal_classes: int = 10  # data.source=fractal: K classes, each one iterated function system
    fractal_images_per_class: int = 500  # one "epoch" of fresh renders


@dataclass
class CurriculumConfig:
    schedule: str = "none"  # none | et | etpp | custom (then `stages` is required)
    stages: Optional[list[dict[str, Any]]] = None  # [{size: 160, fraction: 0.6}, ...] replaces the preset
    budget: Optional[str] = None  # epochs | compute; default: the preset's (et: epochs, etpp: compute)
    mode: str = "fft"  # fft (EfficientTrain) | resize (EfficientTrain++)
    # a floor on every stage's B (a multiple of the patch): e.g. 32 lifts etpp's 24-px stage at a 64 crop (a 3x3 grid
    # with 2 visible patches) to a 4x4 grid; the stage keeps its share of the budget. null: no floor
    min_size: Optional[int] = None


@dataclass
class OptimConfig:
    blr: float = 1.5e-4  # lr = blr * global_batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0  # in budget units: epochs (epochs budget) or full-size-epoch compute
    clip_grad: Optional[float] = None  # max global grad norm; null = no clipping


@dataclass
class TrainConfig:
    epochs: float = 800.0  # the budget: epochs, or full-size-epoch equivalents for a compute budget
    batch_size: int = 64  # per device, per micro-step
    accum_steps: int = 1  # micro-steps per optimizer step
    precision: str = "bf16"  # bf16 | fp16 | fp32
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bit-reproducible CPU tests
    compile: str = "none"  # none | default | reduce-overhead (CUDA graphs) | max-autotune: one graph per input size
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this optimizer step; resume later
    log_every: int = 50  # optimizer steps between logged metrics (also when non-finite losses are checked)
    max_consecutive_nonfinite: int = 5  # skipped updates in a row before the run stops


@dataclass
class CheckpointConfig:
    every_epochs: float = 10.0
    every_steps: Optional[int] = None  # overrides every_epochs when set
    keep_last: int = 3
    resume: bool = True  # relaunching the same command resumes from the latest checkpoint


@dataclass
class TrackingConfig:
    wandb: Union[str, bool] = "auto"  # auto (online when logged in, else offline) | online | offline | off (YAML reads off as false)
    project: str = "mae_et"
    recon_every_epochs: float = 20.0  # reconstruction grid cadence; 0 = only at the end
    recon_images: int = 8
    knn_every_epochs: float = 0.0  # online kNN monitor (k=20, T=0.07, cosine); 0 = off
    knn_split: str = "val"  # labelled held-out split under data.root; the pretraining split is the bank
    knn_batch_size: int = 64


@dataclass
class PretrainConfig:
    name: str = ""  # run name; default: the recipe file name
    output_dir: str = "runs"  # the run folder is output_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Recipe file + overrides -> a validated PretrainConfig (name defaults to the recipe's file name)."""
    data = load_yaml_recipe(path) if path is not None else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    cfg = build_config(PretrainConfig, data)
    if not cfg.name:
        cfg.name = Path(path).stem if path is not None else "pretrain"
    validate_pretrain(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation

PRECISIONS = ("bf16", "fp16", "fp32")
DATA_SOURCES = ("imagefolder", "fractal", "auto")
PIPELINES = ("loader", "memory", "device_decode")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WANDB_MODES = ("auto", "online", "offline", "off")


def check_curriculum_names(c: CurriculumConfig) -> None:
    """The schedule, budget and mode names of a curriculum section (its sizes need the crop and patch)."""
    if c.schedule not in (*curriculum_lib.PRESETS, "custom"):
        raise ConfigError(f"curriculum.schedule '{c.schedule}' is unknown; choose one of {', '.join(curriculum_lib.PRESETS)}, custom")
    if c.budget is not None and c.budget not in curriculum_lib.BUDGETS:
        raise ConfigError(f"curriculum.budget '{c.budget}' is unknown; choose one of {', '.join(curriculum_lib.BUDGETS)}")
    if c.mode not in FREQUENCY_MODES:
        raise ConfigError(f"curriculum.mode '{c.mode}' is unknown; choose one of {', '.join(FREQUENCY_MODES)}")


def resolve_curriculum(c: CurriculumConfig, full_size: int, patch_size: int) -> tuple[list[curriculum_lib.Stage], str]:
    """The checked stage list and budget of a curriculum section (a preset, or the explicit `stages`)."""
    if c.stages is not None:
        stages = []
        for i, s in enumerate(c.stages):
            if not isinstance(s, dict) or set(s) != {"size", "fraction"}:
                raise ConfigError(f"curriculum.stages[{i}] must be {{size: int, fraction: float}}, got {s!r}")
            stages.append(curriculum_lib.Stage(size=int(s["size"]), fraction=float(s["fraction"])))
    elif c.schedule == "custom":
        raise ConfigError("curriculum.schedule=custom needs curriculum.stages: [{size: 160, fraction: 0.6}, ...]")
    else:
        try:
            stages = curriculum_lib.preset_stages(c.schedule, full_size, patch_size)
        except ValueError as e:
            raise ConfigError(f"curriculum: {e}") from None
    if c.min_size is not None:
        if c.min_size % patch_size != 0 or not patch_size <= c.min_size <= full_size:
            raise ConfigError(f"curriculum.min_size {c.min_size} must be a multiple of the patch size {patch_size} "
                              f"between {patch_size} and the crop size {full_size}")
        stages = [curriculum_lib.Stage(size=max(s.size, c.min_size), fraction=s.fraction) for s in stages]
    try:
        curriculum_lib.validate_stages(stages, full_size, patch_size)
    except ValueError as e:
        raise ConfigError(f"curriculum: {e}") from None
    budget = c.budget or curriculum_lib.default_budget(c.schedule if c.schedule != "custom" else "none")
    return stages, budget


def curriculum_stages(cfg: PretrainConfig) -> tuple[list[curriculum_lib.Stage], str]:
    return resolve_curriculum(cfg.curriculum, cfg.data.crop_size, cfg.model.patch_size)


def validate_pretrain(cfg: PretrainConfig) -> None:
    """Cross-field checks; raises ConfigError with one clear line."""
    from mae_et.models.mae import MODEL_SIZES  # local: keeps `config` importable without building models

    m, d, c, o, t = cfg.model, cfg.data, cfg.curriculum, cfg.optim, cfg.train
    if m.size not in MODEL_SIZES:
        raise ConfigError(f"model.size '{m.size}' is unknown; choose one of {', '.join(MODEL_SIZES)}")
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    if m.pos_embed not in ("grid", "extent"):
        raise ConfigError(f"model.pos_embed '{m.pos_embed}' is unknown; choose grid (the reference) or extent")
    if m.patch_size < 1 or d.crop_size % m.patch_size != 0:
        raise ConfigError(
            f"data.crop_size {d.crop_size} is not a multiple of model.patch_size {m.patch_size}; "
            f"use e.g. data.crop_size={max(1, round(d.crop_size / m.patch_size)) * m.patch_size}"
        )
    if d.source not in DATA_SOURCES:
        raise ConfigError(f"data.source '{d.source}' is unknown; choose one of {', '.join(DATA_SOURCES)}")
    if d.pipeline not in PIPELINES:
        raise ConfigError(f"data.pipeline '{d.pipeline}' is unknown; choose one of {', '.join(PIPELINES)}")
    if d.memory_size is not None and d.memory_size < d.crop_size:
        raise ConfigError(f"data.memory_size {d.memory_size} is below data.crop_size {d.crop_size}; use null for the default")
    if d.source == "auto":  # resolved once, here: the saved config says what really ran
        d.source = "imagefolder" if d.root else "fractal"
    if d.source == "fractal":
        if d.fractal_classes < 2 or d.fractal_images_per_class < 1:
            raise ConfigError(f"data.fractal_classes must be >= 2 and data.fractal_images_per_class >= 1, got "
                              f"{d.fractal_classes}, {d.fractal_images_per_class}")
    elif d.root is None or not str(d.root).strip():
        raise ConfigError(
            "data.root is missing: pass data.root=/path/to/imagefolder (class sub-folders of images, "
            "optionally under train/); with a network, torchvision.datasets.Imagenette(root, split='train', "
            "size='320px', download=True) fetches a copy"
        )
    elif not Path(d.root).is_dir():
        raise ConfigError(f"data.root '{d.root}' is not a folder; pass data.root=/path/to/imagefolder")
    lo, hi = d.scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"data.scale must satisfy 0 < min <= max <= 1, got {list(d.scale)}")
    check_curriculum_names(c)
    curriculum_stages(cfg)  # raises on a bad stage list
    if t.compile not in COMPILE_MODES:
        raise ConfigError(f"train.compile '{t.compile}' is unknown; choose one of {', '.join(COMPILE_MODES)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision '{t.precision}' is unknown; choose one of {', '.join(PRECISIONS)}")
    for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("train.accum_steps", t.accum_steps),
                       ("train.log_every", t.log_every), ("train.max_consecutive_nonfinite", t.max_consecutive_nonfinite),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive or null, got {t.max_steps}")
    if o.warmup_epochs < 0 or o.warmup_epochs > t.epochs:
        raise ConfigError(f"optim.warmup_epochs must be in [0, train.epochs={t.epochs}], got {o.warmup_epochs}")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be positive or null, got {o.clip_grad}")
    if cfg.tracking.knn_every_epochs < 0:
        raise ConfigError(f"tracking.knn_every_epochs must be >= 0 (0 = off), got {cfg.tracking.knn_every_epochs}")
    if cfg.tracking.knn_every_epochs > 0 and d.source == "imagefolder" and not (Path(d.root) / cfg.tracking.knn_split).is_dir():
        raise ConfigError(
            f"the kNN monitor needs a labelled split '{Path(d.root) / cfg.tracking.knn_split}'; set tracking.knn_split=<folder "
            f"under data.root> or tracking.knn_every_epochs=0"
        )
    if isinstance(cfg.tracking.wandb, bool):  # YAML 1.1: `off`/`no` -> False, `on`/`yes` -> True
        cfg.tracking.wandb = "auto" if cfg.tracking.wandb else "off"
    if cfg.tracking.wandb not in WANDB_MODES:
        raise ConfigError(f"tracking.wandb '{cfg.tracking.wandb}' is unknown; choose one of {', '.join(WANDB_MODES)}")
    if cfg.checkpoint.every_steps is not None and cfg.checkpoint.every_steps <= 0:
        raise ConfigError(f"checkpoint.every_steps must be positive or null, got {cfg.checkpoint.every_steps}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name '{cfg.name}' must be a non-empty folder name without '/'")
