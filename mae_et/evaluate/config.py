"""Typed configs for the evaluation stage: fine-tuning and linear probing of a pretrained encoder.

Same machinery as pretraining (`mae_et.train.config`): a YAML recipe (with `_base_`), dotted overrides,
`build_config` (an unknown key names the closest valid one), then cross-field checks that fail in
one line before any data is read. Checks that need the encoder (patch size for the curriculum)
or the data (class lists, dataset size) run in the engines, still before the first step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mae_et.recipes import ConfigError, build_config, load_yaml_recipe, merge_dicts, parse_overrides
from mae_et.train.config import PRECISIONS, WANDB_MODES, CheckpointConfig, CurriculumConfig, check_curriculum_names

GLOBAL_POOLS = ("avg", "token")  # avg: mean of patch tokens + fc_norm (MAE fine-tuning); token: cls after the final norm
PROBE_MODES = ("online", "cached")
PROBE_POOLS = ("cls", "mean")  # mae_et.models.vit.encoder_features pools


# ----------------------------------------------------------------------------- shared sections


@dataclass
class EvalModelConfig:
    # one of our pretraining run folders or checkpoint folders, an official MAE .pth, or timm ViT weights
    checkpoint: Optional[str] = None
    global_pool: str = "avg"  # fine-tuning only: avg | token
    drop_path: float = 0.1  # fine-tuning only: stochastic depth rate


@dataclass
class ClassificationDataConfig:
    root: Optional[str] = None  # holds train_split/ and val_split/, each a folder of class sub-folders
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 224  # train and eval side; may differ from pretraining (position embeddings are resampled)
    num_workers: int = 8
    pin_memory: bool = True


@dataclass
class EvalTrackingConfig:
    wandb: Union[str, bool] = "auto"  # auto | online | offline | off (YAML reads off as false)
    project: str = "mae_et"


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneAugmentConfig:
    # timm's create_transform(is_training=True): RandomResizedCrop + flip + RandAugment + RandomErasing
    # mmax9: with Pillow >= 13 a jittered magnitude of 10 makes PosterizeIncreasing ask for 0 bits, which
    # Pillow rejects (a crash a few times in 10,000 images); capping at 9 keeps every op valid
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1-mmax9"
    randaug_ramp_start: Optional[float] = None  # EfficientTrain: RandAugment magnitude grows linearly from this to the recipe's m
    scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: Optional[float] = 0.4  # ignored by timm while auto_augment is set (as in the MAE recipe)
    interpolation: str = "bicubic"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    # timm Mixup / CutMix on the device batch, with SoftTargetCrossEntropy
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1


@dataclass
class FinetuneOptimConfig:
    blr: float = 5e-4  # lr = blr * global_batch / 256
    lr: Optional[float] = None  # absolute lr; overrides blr when set
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # block i of depth L gets lr * layer_decay ** (L - i); the head the full lr
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    clip_grad: Optional[float] = None


@dataclass
class FinetuneTrainConfig:
    epochs: float = 100.0  # for a compute-budget curriculum: full-size-epoch equivalents
    batch_size: int = 32  # per device, per micro-step
    accum_steps: int = 1
    precision: str = "bf16"  # bf16 | fp16 | fp32
    seed: int = 0
    max_steps: Optional[int] = None  # stop (with a checkpoint) after this optimizer step; relaunch to resume
    log_every: int = 50
    eval_batch_size: Optional[int] = None  # per device; default train.batch_size


@dataclass
class FinetuneConfig:
    name: str = ""  # run name; default: the recipe file name
    output_dir: str = "runs"
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)  # the pretraining section, reused
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_epochs=1.0, keep_last=2))
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------- linear probe


@dataclass
class LinprobeSettings:
    mode: str = "online"  # online: augmented images through the frozen encoder each step (reference) | cached: features once
    pool: str = "cls"  # cls token after the final norm (the MAE protocol) | mean of the patch tokens
    encoder_batch: int = 256  # images per frozen-encoder forward; a head batch is encoded in chunks of this


@dataclass
class LinprobeAugmentConfig:  # online mode only; cached features come from centre crops
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True


@dataclass
class LinprobeOptimConfig:
    blr: float = 0.1  # lr = blr * global_batch / 256
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 10.0


@dataclass
class LinprobeTrainConfig:
    epochs: int = 90
    batch_size: int = 16384  # GLOBAL batch (all processes); clamped to the training-set size
    precision: str = "bf16"  # autocast of the frozen encoder; the head trains in fp32
    seed: int = 0
    max_steps: Optional[int] = None
    log_every: int = 20


@dataclass
class LinprobeConfig:
    name: str = ""
    output_dir: str = "runs"
    model: EvalModelConfig = field(default_factory=lambda: EvalModelConfig(global_pool="token", drop_path=0.0))
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    linprobe: LinprobeSettings = field(default_factory=LinprobeSettings)
    augment: LinprobeAugmentConfig = field(default_factory=LinprobeAugmentConfig)
    optim: LinprobeOptimConfig = field(default_factory=LinprobeOptimConfig)
    train: LinprobeTrainConfig = field(default_factory=LinprobeTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_epochs=10.0, keep_last=2))
    tracking: EvalTrackingConfig = field(default_factory=EvalTrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------- loading


def _load(cls: type, path: str | Path | None, overrides: list[str] | None, default_name: str) -> Any:
    data = load_yaml_recipe(path) if path is not None else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    cfg = build_config(cls, data)
    if not cfg.name:
        cfg.name = Path(path).stem if path is not None else default_name
    return cfg


def load_finetune_config(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Recipe file + overrides -> a validated FinetuneConfig (name defaults to the recipe's file name)."""
    cfg = _load(FinetuneConfig, path, overrides, "finetune")
    validate_finetune(cfg)
    return cfg


def load_linprobe_config(path: str | Path | None, overrides: list[str] | None = None) -> LinprobeConfig:
    cfg = _load(LinprobeConfig, path, overrides, "linprobe")
    validate_linprobe(cfg)
    return cfg


# ----------------------------------------------------------------------------- validation


def _check_common(cfg: FinetuneConfig | LinprobeConfig) -> None:
    m, d = cfg.model, cfg.data
    if m.checkpoint is None or not str(m.checkpoint).strip():
        raise ConfigError(
            "model.checkpoint is missing: pass model.checkpoint=runs/<pretraining run> (a run or checkpoint folder, "
            "an official MAE .pth, or timm ViT weights)"
        )
    if not Path(m.checkpoint).exists():
        raise ConfigError(f"model.checkpoint '{m.checkpoint}' does not exist; pass the path of a pretraining run or checkpoint")
    if d.root is None or not str(d.root).strip():
        raise ConfigError(
            f"data.root is missing: pass data.root=/path/to/dataset holding {d.train_split}/ and {d.val_split}/ "
            "class sub-folders (ImageFolder layout)"
        )
    if not Path(d.root).is_dir():
        raise ConfigError(f"data.root '{d.root}' is not a folder; pass data.root=/path/to/dataset")
    if not d.train_split or not d.val_split or d.train_split == d.val_split:
        raise ConfigError(
            f"data.train_split '{d.train_split}' and data.val_split '{d.val_split}' must be two different "
            "sub-folders of data.root"
        )
    if d.img_size <= 0 or d.num_workers < 0:
        raise ConfigError(f"data.img_size must be positive and data.num_workers >= 0, got {d.img_size}, {d.num_workers}")
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision '{t.precision}' is unknown; choose one of {', '.join(PRECISIONS)}")
    for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("train.log_every", t.log_every),
                       ("checkpoint.keep_last", cfg.checkpoint.keep_last)):
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps must be positive or null, got {t.max_steps}")
    if not 0 <= cfg.optim.warmup_epochs <= t.epochs:
        raise ConfigError(f"optim.warmup_epochs must be in [0, train.epochs={t.epochs}], got {cfg.optim.warmup_epochs}")
    if cfg.checkpoint.every_epochs <= 0 or (cfg.checkpoint.every_steps is not None and cfg.checkpoint.every_steps <= 0):
        raise ConfigError("checkpoint.every_epochs and checkpoint.every_steps must be positive")
    if isinstance(cfg.tracking.wandb, bool):  # YAML 1.1: `off`/`no` -> False, `on`/`yes` -> True
        cfg.tracking.wandb = "auto" if cfg.tracking.wandb else "off"
    if cfg.tracking.wandb not in WANDB_MODES:
        raise ConfigError(f"tracking.wandb '{cfg.tracking.wandb}' is unknown; choose one of {', '.join(WANDB_MODES)}")
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name '{cfg.name}' must be a non-empty folder name without '/'")


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Cross-field checks that need neither the data nor the encoder; one clear line each."""
    _check_common(cfg)
    m, a, c, o, t = cfg.model, cfg.augment, cfg.curriculum, cfg.optim, cfg.train
    if m.global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"model.global_pool '{m.global_pool}' is unknown; choose one of {', '.join(GLOBAL_POOLS)}")
    if not 0.0 <= m.drop_path < 1.0:
        raise ConfigError(f"model.drop_path must be in [0, 1), got {m.drop_path}")
    if t.accum_steps <= 0:
        raise ConfigError(f"train.accum_steps must be positive, got {t.accum_steps}")
    if t.eval_batch_size is not None and t.eval_batch_size <= 0:
        raise ConfigError(f"train.eval_batch_size must be positive or null, got {t.eval_batch_size}")
    if not 0.0 < o.layer_decay <= 1.0:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
    if o.clip_grad is not None and o.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be positive or null, got {o.clip_grad}")
    lo, hi = a.scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"augment.scale must satisfy 0 < min <= max <= 1, got {list(a.scale)}")
    if not 0.0 <= a.reprob <= 1.0 or not 0.0 <= a.smoothing < 1.0 or not 0.0 <= a.mixup_prob <= 1.0:
        raise ConfigError("augment.reprob and augment.mixup_prob must be in [0, 1], augment.smoothing in [0, 1)")
    if a.mixup_mode not in ("batch", "pair", "elem"):
        raise ConfigError(f"augment.mixup_mode '{a.mixup_mode}' is unknown; choose one of batch, pair, elem")
    if (a.mixup > 0 or a.cutmix > 0) and a.mixup_prob > 0 and t.batch_size % 2 != 0:
        raise ConfigError(f"mixup/cutmix need an even per-device batch; got train.batch_size={t.batch_size}")
    if a.randaug_ramp_start is not None:
        target = randaug_magnitude(a.auto_augment)  # raises when there is no RandAugment to ramp
        if not 0.0 <= a.randaug_ramp_start <= target:
            raise ConfigError(f"augment.randaug_ramp_start must be in [0, {target:g}] (the recipe's magnitude), got {a.randaug_ramp_start}")
    check_curriculum_names(c)


def validate_linprobe(cfg: LinprobeConfig) -> None:
    _check_common(cfg)
    p, o = cfg.linprobe, cfg.optim
    if p.mode not in PROBE_MODES:
        raise ConfigError(f"linprobe.mode '{p.mode}' is unknown; choose one of {', '.join(PROBE_MODES)}")
    if p.pool not in PROBE_POOLS:
        raise ConfigError(f"linprobe.pool '{p.pool}' is unknown; choose one of {', '.join(PROBE_POOLS)}")
    if p.encoder_batch <= 0:
        raise ConfigError(f"linprobe.encoder_batch must be positive, got {p.encoder_batch}")
    if not 0.0 <= o.momentum < 1.0 or o.weight_decay < 0:
        raise ConfigError(f"optim.momentum must be in [0, 1) and optim.weight_decay >= 0, got {o.momentum}, {o.weight_decay}")
    lo, hi = cfg.augment.scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"augment.scale must satisfy 0 < min <= max <= 1, got {list(cfg.augment.scale)}")


# ----------------------------------------------------------------------------- helpers shared by the engines


def _ra_key(part: str) -> str:
    """timm's RandAugment option key: 'm9' -> 'm', 'mstd0.5' -> 'mstd', 'inc1' -> 'inc'."""
    return re.split(r"(\d.*)", part)[0]


def randaug_magnitude(auto_augment: Optional[str]) -> int:
    """The `m` of a timm RandAugment string ('rand-m9-mstd0.5-inc1' -> 9)."""
    if not auto_augment or not auto_augment.startswith("rand"):
        raise ConfigError(
            f"augment.randaug_ramp_start needs a RandAugment policy in augment.auto_augment (e.g. rand-m9-mstd0.5-inc1), "
            f"got {auto_augment!r}"
        )
    for part in auto_augment.split("-")[1:]:
        if _ra_key(part) == "m" and part[1:].isdigit():
            return int(part[1:])
    raise ConfigError(f"augment.auto_augment '{auto_augment}' has no integer magnitude 'm<number>' to ramp")


def with_randaug_magnitude(auto_augment: str, magnitude: int) -> str:
    """'rand-m9-mstd0.5-inc1', 4 -> 'rand-m4-mstd0.5-inc1' (timm reads m as an integer)."""
    parts = auto_augment.split("-")
    return "-".join([parts[0]] + [f"m{int(magnitude)}" if _ra_key(p) == "m" else p for p in parts[1:]])
