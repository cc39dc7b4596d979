"""Typed configs for the evaluation stage (fine-tuning, linear probing): the schema, each field's rule beside it,
and the cross-field checks, each failing in one line before any data is read. Checks that need the encoder (the
patch size) or the data (class lists, dataset size) run in the engines, still before the first step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from dataclasses import replace as replaced
from pathlib import Path
from typing import Annotated, Any, Literal

from mae_et.curriculum.schedules import CurriculumConfig
from mae_et.data.sources import check_splits_apart
from mae_et.models.vit import FeaturePool, GlobalPool
from mae_et.recipes import (
    Check,
    ConfigError,
    UnitInterval,
    build_config,
    load_yaml_recipe,
    merge_dicts,
    parse_overrides,
)
from mae_et.run.config import (
    Beta,
    CheckpointConfig,
    NonNegativeFloat,
    NonNegativeInt,
    PlanSpec,
    PositiveFloat,
    PositiveInt,
    Precision,
    RunConfig,
    RunSpec,
    SeedInt,
    TrackingConfig,
    check_min_lr,
    check_name,
    check_scale,
    check_warmup,
)

ProbeMode = Literal["online", "cached"]
MixupMode = Literal["batch", "pair", "elem"]  # timm Mixup: one draw per batch | per pair | per element
# timm's names (timm.data.transforms' string-to-mode tables, and its RandomResizedCropAndInterpolation's `random`)
Interpolation = Literal["random", "nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"]
EraseMode = Literal["pixel", "rand", "const"]  # timm RandomErasing: per-pixel noise | per-channel noise | zeros


# ----------------------------------------------------------------------------- shared sections


@dataclass
class EvalModelConfig:
    # one of our pretraining run folders or checkpoint folders, an official MAE .pth, or timm ViT weights
    checkpoint: str | None = None
    global_pool: GlobalPool = "avg"  # fine-tuning only: avg | token
    drop_path: Annotated[float, Check(ge=0, lt=1)] = 0.1  # fine-tuning only: stochastic depth rate


@dataclass
class ClassificationDataConfig:
    root: str | None = None  # holds train_split/ and val_split/, each a folder of class sub-folders
    train_split: str = "train"
    val_split: str = "val"
    img_size: PositiveInt = 224  # train and eval side; may differ from pretraining (position embeddings are resampled)
    num_workers: NonNegativeInt = 8
    pin_memory: bool = True


# ----------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneAugmentConfig:
    # timm's create_transform(is_training=True): RandomResizedCrop + flip + RandAugment + RandomErasing
    # mmax9: with Pillow >= 13 a jittered magnitude of 10 makes PosterizeIncreasing ask for 0 bits, which
    # Pillow rejects (a crash a few times in 10,000 images); capping at 9 keeps every op valid
    auto_augment: str | None = "rand-m9-mstd0.5-inc1-mmax9"
    randaug_ramp_start: NonNegativeFloat | None = None  # EfficientTrain: magnitude grows from this to the recipe's m
    scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: NonNegativeFloat | None = 0.4  # ignored by timm while auto_augment is set (as in the MAE recipe)
    interpolation: Interpolation = "bicubic"
    reprob: Annotated[float, UnitInterval] = 0.25
    remode: EraseMode = "pixel"
    recount: PositiveInt = 1
    # timm Mixup / CutMix on the device batch, with SoftTargetCrossEntropy
    mixup: NonNegativeFloat = 0.8  # Beta(alpha, alpha); 0 = off
    cutmix: NonNegativeFloat = 1.0
    mixup_prob: Annotated[float, UnitInterval] = 1.0
    mixup_switch_prob: Annotated[float, UnitInterval] = 0.5
    mixup_mode: MixupMode = "batch"
    smoothing: Annotated[float, Check(ge=0, lt=1)] = 0.1


@dataclass
class FinetuneOptimConfig:
    blr: PositiveFloat = 5e-4  # lr = blr * global_batch / 256
    lr: PositiveFloat | None = None  # absolute lr; overrides blr when set
    min_lr: NonNegativeFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.05
    # block i of depth L gets lr * layer_decay ** (L - i); the head the full lr
    layer_decay: Annotated[float, Check(gt=0, le=1)] = 0.65
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    warmup_epochs: NonNegativeFloat = 5.0
    clip_grad: PositiveFloat | None = None


@dataclass
class FinetuneTrainConfig:
    epochs: PositiveFloat = 100.0  # for a compute-budget curriculum: full-size-epoch equivalents
    batch_size: PositiveInt = 32  # per device, per micro-step
    accum_steps: PositiveInt = 1
    precision: Precision = "bf16"  # bf16 | fp16 | fp32
    seed: SeedInt = 0
    max_steps: PositiveInt | None = None  # stop (with a checkpoint) after this optimizer step; relaunch to resume
    log_every: PositiveInt = 50
    eval_batch_size: PositiveInt | None = None  # per device; default train.batch_size


@dataclass
class FinetuneConfig(RunConfig):  # name, output_dir
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    augment: FinetuneAugmentConfig = field(default_factory=FinetuneAugmentConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)  # the same section as pretraining's
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_epochs=1.0, keep_last=2))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def run_spec(self) -> RunSpec:
        t, encoder = self.train, self.model.checkpoint
        reads = (self.data.root, encoder)
        return RunSpec.of(self, self.tracking, self.checkpoint, t.precision, t.accum_steps, reads, encoder)

    def plan_spec(self) -> PlanSpec:
        return PlanSpec.of(self.train, self.optim, self.checkpoint, self.train.batch_size, self.train.accum_steps)


# ----------------------------------------------------------------------------- linear probe


@dataclass
class LinprobeSettings:
    # online: augmented images through the frozen encoder each step (the reference) | cached: features once
    mode: ProbeMode = "online"
    pool: FeaturePool = "cls"  # cls token after the final norm (the MAE protocol) | mean of the patch tokens
    encoder_batch: PositiveInt = 256  # images per frozen-encoder forward; a head batch is encoded in chunks of this


@dataclass
class LinprobeAugmentConfig:  # online mode only; cached features come from centre crops
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True


@dataclass
class LinprobeOptimConfig:
    blr: PositiveFloat = 0.1  # lr = blr * global_batch / 256
    lr: PositiveFloat | None = None
    min_lr: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.0
    momentum: Annotated[float, Check(ge=0, lt=1)] = 0.9
    warmup_epochs: NonNegativeFloat = 10.0


@dataclass
class LinprobeTrainConfig:
    epochs: PositiveInt = 90
    batch_size: PositiveInt = 16384  # GLOBAL batch (all processes); clamped to the training-set size
    precision: Precision = "bf16"  # autocast of the frozen encoder; the head trains in fp32
    seed: SeedInt = 0
    max_steps: PositiveInt | None = None
    log_every: PositiveInt = 20


@dataclass
class LinprobeConfig(RunConfig):  # name, output_dir
    model: EvalModelConfig = field(default_factory=lambda: EvalModelConfig(global_pool="token", drop_path=0.0))
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    linprobe: LinprobeSettings = field(default_factory=LinprobeSettings)
    augment: LinprobeAugmentConfig = field(default_factory=LinprobeAugmentConfig)
    optim: LinprobeOptimConfig = field(default_factory=LinprobeOptimConfig)
    train: LinprobeTrainConfig = field(default_factory=LinprobeTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_epochs=10.0, keep_last=2))
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def run_spec(self) -> RunSpec:
        """The head trains in fp32 with no accumulation: train.precision is the frozen encoder's autocast only."""
        encoder = self.model.checkpoint
        return RunSpec.of(self, self.tracking, self.checkpoint, "fp32", 1, (self.data.root, encoder), encoder)

    def plan_spec(self, micro_batch: int) -> PlanSpec:
        """`micro_batch`: this process's share of the global batch (train.batch_size, clamped to the data)."""
        return PlanSpec.of(self.train, self.optim, self.checkpoint, micro_batch, 1)


# ----------------------------------------------------------------------------- loading


def _load(cls: type, path: str | Path | None, overrides: list[str] | None, default_name: str) -> Any:
    data = load_yaml_recipe(path) if path is not None else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    cfg = build_config(cls, data)
    return replaced(cfg, name=cfg.name or (Path(path).stem if path is not None else default_name))


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


def _check_common(cfg: FinetuneConfig | LinprobeConfig, plan: PlanSpec) -> None:
    """What the two evaluation configs share that no single field can say (each field's rule is in the schema)."""
    m, d = cfg.model, cfg.data
    if m.checkpoint is None or not str(m.checkpoint).strip():
        raise ConfigError(
            "model.checkpoint is missing: pass model.checkpoint=runs/<pretraining run> (a run or checkpoint folder, "
            "an official MAE .pth, or timm ViT weights)"
        )
    if not Path(m.checkpoint).exists():
        raise ConfigError(
            f"model.checkpoint '{m.checkpoint}' does not exist; pass the path of a pretraining run or checkpoint"
        )
    if d.root is None or not str(d.root).strip():
        raise ConfigError(
            f"data.root is missing: pass data.root=/path/to/dataset holding {d.train_split}/ and {d.val_split}/ "
            "class sub-folders (ImageFolder layout)"
        )
    if not Path(d.root).is_dir():
        raise ConfigError(f"data.root '{d.root}' is not a folder; pass data.root=/path/to/dataset")
    check_splits_apart(Path(d.root) / d.train_split, "data.train_split", Path(d.root) / d.val_split, "data.val_split")
    check_warmup(plan)
    check_name(cfg.name)


def validate_finetune(cfg: FinetuneConfig) -> None:
    """Cross-field checks that need neither the data nor the encoder; one clear line each."""
    plan = cfg.plan_spec()
    _check_common(cfg, plan)
    a, t = cfg.augment, cfg.train
    check_min_lr(plan)
    check_scale("augment.scale", a.scale)
    if (a.mixup > 0 or a.cutmix > 0) and a.mixup_prob > 0 and t.batch_size % 2 != 0:
        raise ConfigError(f"mixup/cutmix need an even per-device batch; got train.batch_size={t.batch_size}")
    check_auto_augment(a.auto_augment)
    if a.randaug_ramp_start is not None:
        target = randaug_magnitude(a.auto_augment)  # raises when there is no RandAugment to ramp
        if not 0.0 <= a.randaug_ramp_start <= target:
            raise ConfigError(
                f"augment.randaug_ramp_start must be in [0, {target:g}] (the recipe's magnitude), got "
                f"{a.randaug_ramp_start}"
            )


def validate_linprobe(cfg: LinprobeConfig) -> None:
    plan = cfg.plan_spec(micro_batch=cfg.train.batch_size)  # the global batch (smaller only when the data is)
    _check_common(cfg, plan)
    check_min_lr(plan)
    check_scale("augment.scale", cfg.augment.scale)


# ----------------------------------------------------------------------------- helpers shared by the engines


# timm's policy families (timm.data.create_transform picks the builder by the string's start)
_AA_POLICY = re.compile(r"rand(-[a-z]+[\d.]+)*|augmix(-[a-z]+[\d.]+)*|original|originalr|v0|v0r|3a")


def check_auto_augment(auto_augment: str | None) -> None:
    """An `augment.auto_augment` timm knows, whose every op runs at every magnitude it can draw, checked now: timm
    and Pillow would fail only at the first transform, or a few images into a run."""
    if auto_augment is None or auto_augment == "":
        return
    detail = None
    if _AA_POLICY.fullmatch(auto_augment) is not None:
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        build = (
            rand_augment_transform
            if auto_augment.startswith("rand")
            else augment_and_mix_transform
            if auto_augment.startswith("augmix")
            else auto_augment_transform
        )
        try:
            policy = build(auto_augment, {"translate_const": 100, "img_mean": (124, 116, 104)})
        except (AssertionError, ValueError, KeyError) as e:
            detail = str(e) or None
        else:
            _check_ops_run(auto_augment, policy)
            return
    raise ConfigError(
        f"augment.auto_augment '{auto_augment}' is not a policy timm knows"
        + (f" ({detail})" if detail else "")
        + "; use one such as rand-m9-mstd0.5-inc1-mmax9 (RandAugment), augmix-m5-w4-d2 or original, or null for none"
    )


def _check_ops_run(auto_augment: str, policy: Any) -> None:
    """Each op of a built timm policy, applied to a tiny image at both ends of the magnitudes it draws (m, [0, m]
    for mstd inf, m +- 6 mstd otherwise, clipped to [0, mmax or 10])."""
    from PIL import Image

    image = Image.new("RGB", (8, 8), (120, 60, 200))
    ops = policy.ops if hasattr(policy, "ops") else [op for sub_policy in policy.policy for op in sub_policy]
    for op in ops:
        m, std, upper = op.magnitude, op.magnitude_std, op.magnitude_max or 10.0
        low, high = (0.0, m) if std == float("inf") else (m - 6 * std, m + 6 * std) if std > 0 else (m, m)
        for magnitude in sorted({max(0.0, min(x, upper)) for x in (low, high)}):
            op.prob, op.magnitude_std, op.magnitude = 1.0, 0.0, magnitude
            try:
                op(image)
            except Exception as e:  # whatever the op raises, it would raise a few images into the run
                raise ConfigError(
                    f"augment.auto_augment '{auto_augment}': its {op.name} op fails at magnitude {magnitude:g}, "
                    f"which it draws ({type(e).__name__}: {e}); choose magnitudes it runs at (e.g. "
                    "rand-m9-mstd0.5-inc1-mmax9) or another policy"
                ) from None


def _ra_key(part: str) -> str:
    """timm's RandAugment option key: 'm9' -> 'm', 'mstd0.5' -> 'mstd', 'inc1' -> 'inc'."""
    return re.split(r"(\d.*)", part)[0]


def randaug_magnitude(auto_augment: str | None) -> int:
    """The `m` of a timm RandAugment string ('rand-m9-mstd0.5-inc1' -> 9)."""
    if not auto_augment or not auto_augment.startswith("rand"):
        raise ConfigError(
            "augment.randaug_ramp_start needs a RandAugment policy in augment.auto_augment (e.g. "
            "rand-m9-mstd0.5-inc1), "
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
