"""The pretraining recipe schema (model, data, curriculum, optim, train, checkpoint, tracking) and its cross-field
rules. Loading is `mae_et.recipes`; `validate_pretrain` checks what no single field can (sizes vs the patch, the
curriculum vs the crop, ...), so every mistake fails in one line before any training. The keys: docs/pretraining.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as replaced
from pathlib import Path
from typing import Annotated, Literal, get_args

from mae_et.curriculum.schedules import CurriculumConfig, Stage, resolve_curriculum
from mae_et.data.sources import check_splits_apart, data_dir
from mae_et.models.mae import DecodeFractionOf, MAESpec, ModelSize, PosEmbed, Target
from mae_et.recipes import Check, ConfigError, build_config, load_yaml_recipe, merge_dicts, parse_overrides
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

# ----------------------------------------------------------------------------- schema

# The choices of the recipe keys that take words, declared once: the coercer checks them (mae_et.recipes)
DataSource = Literal["imagefolder", "shards", "fractal", "auto"]  # auto: fractal unless data.root (resolved on load)
Pipeline = Literal["loader", "memory", "device_decode"]
DecodeSize = Literal["crop", "stage"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
PIPELINES = get_args(Pipeline)


@dataclass
class ModelConfig:
    size: ModelSize = "base"
    patch_size: PositiveInt = 16
    decoder_embed_dim: PositiveInt = 512
    decoder_depth: PositiveInt = 8
    decoder_num_heads: PositiveInt = 16
    norm_pix_loss: bool = True
    mask_ratio: Annotated[float, Check(gt=0, lt=1)] = 0.75
    pos_embed: PosEmbed = "grid"  # positions at a reduced B: grid (0..g-1, the reference) | extent (over the full grid)
    # share of ALL patches the decoder reconstructs in training (CrossMAE); 1.0 = every masked patch, the reference
    decode_fraction: Annotated[float, Check(gt=0, le=1)] = 1.0
    decode_fraction_of: DecodeFractionOf = "stage"  # that share of B's own patches | of the full crop's (full_size)
    target: Target = "pixel"  # pixel (MAE) | hog (MaskFeat's histograms; needs norm_pix_loss: false)
    hog_cell_size: PositiveInt = 8  # hog: cell side in px (MaskFeat: 8); divides patch_size
    hog_bins: Annotated[int, Check(ge=2)] = 9  # hog: unsigned orientation bins over 180 degrees (MaskFeat: 9)
    # continued pretraining from these weights (a run or checkpoint folder, an official MAE .pth, a transformers
    # ViTMAE folder), at a fresh start only (mae_et.models.start)
    init: str | None = None
    init_sha256: str | None = None  # sha256 of the start point's weights file: recorded by the run; given, checked


@dataclass
class DataConfig:
    source: DataSource = "imagefolder"  # imagefolder | shards (mae_et.data.shards) | fractal | auto (fractal w/o root)
    root: str | None = None  # an ImageFolder (class sub-folders of images); shards: their folder, index.json or URL
    shard_cache: str = "~/.cache/mae_et/shards"  # data.source=shards from a URL: where shards are kept once fetched
    split: str = "train"  # sub-folder of root to pretrain on when it exists; "" = root itself
    crop_size: PositiveInt = 224  # RandomResizedCrop output side: the full curriculum size
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    strict: bool = False  # true: the first unreadable file is an error instead of a counted skip
    num_workers: NonNegativeInt = 8
    pin_memory: bool = True
    pipeline: Pipeline = "loader"  # loader (PIL in workers) | memory (decode once, crop on the device) | device_decode
    memory_size: PositiveInt | None = None  # memory pipeline: stored side (default crop_size * 256/224)
    memory_on_device: bool = True  # memory pipeline: keep the store on the GPU (false: pinned CPU memory)
    decode_size: DecodeSize = "crop"  # stage: the loader decodes JPEGs at reduced scale straight to B (mode=resize)
    fractal_classes: Annotated[int, Check(ge=2)] = 10  # data.source=fractal: K classes, one function system each
    fractal_images_per_class: PositiveInt = 500  # one "epoch" of fresh renders


@dataclass
class OptimConfig:
    blr: PositiveFloat = 1.5e-4  # lr = blr * global_batch / 256
    lr: PositiveFloat | None = None  # absolute lr; overrides blr when set
    min_lr: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    warmup_epochs: NonNegativeFloat = 40.0  # in budget units: epochs (epochs budget) or full-size-epoch compute
    clip_grad: PositiveFloat | None = None  # max global grad norm; null = no clipping


@dataclass
class TrainConfig:
    epochs: PositiveFloat = 800.0  # the budget: epochs, or full-size-epoch equivalents for a compute budget
    batch_size: PositiveInt = 64  # per device, per micro-step
    accum_steps: PositiveInt = 1  # micro-steps per optimizer step
    precision: Precision = "bf16"  # bf16 | fp16 | fp32
    seed: SeedInt = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bit-reproducible CPU tests
    compile: CompileMode = "none"  # none | default | reduce-overhead (CUDA graphs) | max-autotune: a graph per B
    max_steps: PositiveInt | None = None  # stop (with a checkpoint) after this optimizer step; resume later
    log_every: PositiveInt = 50  # optimizer steps between logged metrics (also when non-finite losses are checked)
    max_consecutive_nonfinite: PositiveInt = 5  # skipped updates in a row before the run stops


@dataclass
class PretrainTrackingConfig(TrackingConfig):  # W&B, and what the pretraining loop watches
    recon_every_epochs: NonNegativeFloat = 20.0  # reconstruction grid cadence; 0 = off
    recon_images: PositiveInt = 8
    knn_every_epochs: NonNegativeFloat = 0.0  # online kNN monitor (k=20, T=0.07, cosine); 0 = off
    knn_split: str = "val"  # labelled held-out split under data.root; the pretraining split is the bank
    knn_batch_size: PositiveInt = 64


@dataclass
class PretrainConfig(RunConfig):  # name, output_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: PretrainTrackingConfig = field(default_factory=PretrainTrackingConfig)

    def run_spec(self) -> RunSpec:
        t = self.train
        return RunSpec.of(self, self.tracking, self.checkpoint, t.precision, t.accum_steps, reads=(self.data.root,))

    def plan_spec(self) -> PlanSpec:
        return PlanSpec.of(self.train, self.optim, self.checkpoint, self.train.batch_size, self.train.accum_steps)


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """Recipe file + overrides -> a validated PretrainConfig (name defaults to the recipe's file name)."""
    data = load_yaml_recipe(path) if path is not None else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    cfg = resolve_defaults(build_config(PretrainConfig, data), Path(path).stem if path is not None else "pretrain")
    validate_pretrain(cfg)
    return cfg


def resolve_defaults(cfg: PretrainConfig, default_name: str) -> PretrainConfig:
    """The defaults that depend on other keys, made explicit on load so the saved config says what ran: the name
    (the recipe's file name) and data.source=auto (fractal unless data.root is given)."""
    name = cfg.name or default_name
    source = ("imagefolder" if cfg.data.root else "fractal") if cfg.data.source == "auto" else cfg.data.source
    return replaced(cfg, name=name, data=replaced(cfg.data, source=source))


# ----------------------------------------------------------------------------- what the config builds


def curriculum_stages(cfg: PretrainConfig) -> tuple[list[Stage], str]:
    """The checked stage list and budget of a pretraining config (`mae_et.curriculum.schedules.resolve_curriculum`)."""
    return resolve_curriculum(cfg.curriculum, cfg.data.crop_size, cfg.model.patch_size)


def mae_spec(cfg: PretrainConfig) -> MAESpec:
    """The MAE a pretraining config builds (`mae_et.models.mae.build_mae`)."""
    m = cfg.model
    return MAESpec(
        size=m.size,
        patch_size=m.patch_size,
        img_size=cfg.data.crop_size,
        decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads,
        norm_pix_loss=m.norm_pix_loss,
        pos_embed=m.pos_embed,
        target=m.target,
        hog_cell_size=m.hog_cell_size,
        hog_bins=m.hog_bins,
    )


# ----------------------------------------------------------------------------- validation


def validate_pretrain(cfg: PretrainConfig) -> None:
    """What no single field can say (each field's own rule is in the schema); raises ConfigError in one line and
    changes nothing."""
    m, d = cfg.model, cfg.data
    check_heads(m.decoder_embed_dim, m.decoder_num_heads)
    check_target(m)
    if m.init is not None and not Path(m.init).exists():
        raise ConfigError(
            f"model.init '{m.init}' does not exist; pass model.init=<a run or checkpoint folder, an official MAE "
            ".pth such as mae_pretrain_vit_base_full.pth, or a transformers ViTMAE folder>, or model.init=null"
        )
    if d.crop_size % m.patch_size != 0:
        raise ConfigError(
            f"data.crop_size {d.crop_size} is not a multiple of model.patch_size {m.patch_size}; "
            f"use e.g. data.crop_size={max(1, round(d.crop_size / m.patch_size)) * m.patch_size}"
        )
    if d.memory_size is not None and d.memory_size < d.crop_size:
        raise ConfigError(
            f"data.memory_size {d.memory_size} is below data.crop_size {d.crop_size}; use null for the default"
        )
    if d.source == "imagefolder":
        if d.root is None or not str(d.root).strip():
            raise ConfigError(
                "data.root is missing: pass data.root=/path/to/imagefolder (class sub-folders of images, "
                "optionally under train/); with a network, torchvision.datasets.Imagenette(root, split='train', "
                "size='320px', download=True) fetches a copy"
            )
        if not Path(d.root).is_dir():
            raise ConfigError(f"data.root '{d.root}' is not a folder; pass data.root=/path/to/imagefolder")
        data_dir(d)  # a data.split that is not there: one line now, never a run on the root with val/ as a class
    check_scale("data.scale", d.scale)
    if d.source == "shards":
        if d.root is None or not str(d.root).strip():
            raise ConfigError(
                "data.root is missing: pass data.root=<folder, index.json or http(s) URL of shards written by "
                "python -m mae_et.data.shards>"
            )
        if d.pipeline != "loader":
            raise ConfigError(
                f"data.source=shards is read by the loader's workers; data.pipeline={d.pipeline} reads folders "
                "only: use data.pipeline=loader"
            )
        if cfg.tracking.knn_every_epochs > 0:
            raise ConfigError(
                "the kNN monitor reads a labelled ImageFolder split under data.root, which a shard set is not: "
                "set tracking.knn_every_epochs=0 (evaluate with mae-et knn on the folder instead)"
            )
    if d.decode_size == "stage" and (d.source not in ("imagefolder", "shards") or d.pipeline != "loader"):
        raise ConfigError(
            "data.decode_size=stage decodes at reduced scale in the loader's workers: it needs data.pipeline=loader "
            f"and data.source=imagefolder (got {d.pipeline} / {d.source}); or data.decode_size=crop"
        )
    if d.decode_size == "stage" and cfg.curriculum.mode != "resize":
        raise ConfigError(
            "data.decode_size=stage crops straight to the stage's B, which is only what the model sees with "
            f"curriculum.mode=resize (got {cfg.curriculum.mode}: a low-frequency crop of the full-size image); "
            "set curriculum.mode=resize or data.decode_size=crop"
        )
    stages, _ = curriculum_stages(cfg)  # raises on a bad stage list
    check_masking(m.mask_ratio, [s.size for s in stages], m.patch_size)
    check_warmup(cfg.plan_spec())
    check_min_lr(cfg.plan_spec())
    if cfg.tracking.knn_every_epochs > 0 and d.source == "imagefolder":
        held_out = Path(d.root) / cfg.tracking.knn_split
        if not held_out.is_dir():
            raise ConfigError(
                f"the kNN monitor needs a labelled split '{held_out}'; set tracking.knn_split=<folder under "
                "data.root> or tracking.knn_every_epochs=0"
            )
        check_splits_apart(data_dir(d), "data.split", held_out, "tracking.knn_split")  # the bank is what trains
    check_name(cfg.name)


# ----------------------------------------------------------------------------- cross-field rules


def check_heads(decoder_dim: int, decoder_heads: int) -> None:
    """The decoder's heads split its width evenly (else timm asserts mid-build), and its sin-cos positions take
    four equal parts of it (the encoder presets hold both, tested)."""
    if decoder_dim % 4 != 0:
        raise ConfigError(
            f"model.decoder_embed_dim {decoder_dim} is not a multiple of 4 (its 2-D sin-cos positions split it in "
            f"four); use e.g. {max(4, round(decoder_dim / 4) * 4)}"
        )
    if decoder_dim % decoder_heads != 0:
        divisors = [h for h in range(1, min(decoder_dim, 32) + 1) if decoder_dim % h == 0]
        raise ConfigError(
            f"model.decoder_embed_dim {decoder_dim} does not divide into model.decoder_num_heads "
            f"{decoder_heads} heads; use one of {', '.join(map(str, divisors[-6:]))} heads, or another width"
        )


def check_target(m: ModelConfig) -> None:
    """The HOG target's cells tile each patch, and it has no pixels for norm_pix_loss to normalise."""
    if m.target != "hog":
        return
    if m.norm_pix_loss:
        raise ConfigError(
            "model.norm_pix_loss=true normalises pixel patches and model.target=hog has none (its cells "
            "are L2-normalised already); add model.norm_pix_loss=false"
        )
    if m.patch_size % m.hog_cell_size != 0:
        divisors = [c for c in range(1, m.patch_size + 1) if m.patch_size % c == 0]
        raise ConfigError(
            f"model.hog_cell_size {m.hog_cell_size} does not divide model.patch_size {m.patch_size}; use one "
            f"of {', '.join(map(str, divisors))}"
        )


def check_masking(mask_ratio: float, sizes: list[int], patch_size: int) -> None:
    """Every input size B keeps at least one visible patch (the encoder's input) and one masked (the loss)."""
    for size in sorted(set(sizes)):
        patches = (size // patch_size) ** 2
        kept = int(patches * (1 - mask_ratio))
        if not 1 <= kept < patches:
            raise ConfigError(
                f"at input size {size} ({size // patch_size}x{size // patch_size} patches of {patch_size}) "
                f"model.mask_ratio {mask_ratio} keeps {kept} of {patches} patches visible; every size needs at least "
                "one visible and one masked patch: raise data.crop_size (or curriculum.min_size), or lower "
                "model.patch_size or model.mask_ratio"
            )
