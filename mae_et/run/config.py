"""What every run config shares, declared once: the value ranges, the run's name and folder, the checkpoint and
tracking sections and the rules on them; and the two specs the run layer takes (`RunSpec` for `Run`, `PlanSpec`
for `plan_run`), which each config gives (`run_spec()`, `plan_spec()`) holding only the fields they read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from mae_et.recipes import Check, ConfigError, FromBool, NonNegative, Positive, Seed, Text, config_to_dict

# ----------------------------------------------------------------------------- the shared schema

Precision = Literal["bf16", "fp16", "fp32"]
# YAML 1.1 reads `off`/`no` as false and `on`/`yes` as true: read as the words they stand for
WandbMode = Annotated[Literal["auto", "online", "offline", "off"], FromBool(true="auto", false="off")]
# the ranges of the keys the run configs have in common (a test checks that they are declared alike)
PositiveInt = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
PositiveFloat = Annotated[float, Positive]
NonNegativeFloat = Annotated[float, NonNegative]
SeedInt = Annotated[int, Seed]
Beta = Annotated[float, Check(ge=0, lt=1)]  # an Adam moment decay (at 1 its bias correction divides by zero)
# wandb's own rule on a project name (wandb.sdk.wandb_settings.Settings.validate_project), checked on load
WandbProject = Annotated[str, Text(what="a W&B project name", max_len=128, forbidden="/\\#?%:")]


@dataclass
class RunConfig:
    """The first keys of every run config (pretraining, fine-tuning, linear probe)."""

    name: str = ""  # run name; default: the recipe file name
    output_dir: str = "runs"  # the run folder is output_dir/name

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class CheckpointConfig:
    every_epochs: NonNegativeFloat = 10.0  # 0 = off: only the launch's last step (the end, or train.max_steps)
    every_steps: PositiveInt | None = None  # overrides every_epochs when set
    keep_last: PositiveInt = 3
    resume: bool = True  # relaunching the same command resumes from the latest checkpoint


@dataclass
class TrackingConfig:
    wandb: WandbMode = "auto"  # auto (online when logged in, else offline) | online | offline | off
    project: WandbProject = "mae_et"


# ----------------------------------------------------------------------------- what the run layer reads


@dataclass(frozen=True)
class RunSpec:
    """What `mae_et.run.run.Run` reads of a run config."""

    name: str
    output_dir: str
    run_dir: Path
    config: dict[str, Any]  # the resolved config: saved in the run folder and its checkpoints, compared on resume
    precision: Precision  # the accelerator's mixed precision
    accum_steps: int
    checkpoint: CheckpointConfig  # resume and keep_last (the cadence is the plan's)
    wandb: str
    project: str
    reads: tuple[str | None, ...]  # what the run reads (data.root, an encoder): never inside nor around its folder
    encoder: str | None = None  # an evaluation's model.checkpoint: its run folder resumes only from the same one

    @classmethod
    def of(
        cls,
        cfg: RunConfig,
        tracking: TrackingConfig,
        checkpoint: CheckpointConfig,
        precision: Precision,
        accum_steps: int,
        reads: tuple[str | None, ...],
        encoder: str | None = None,
    ) -> RunSpec:
        return cls(
            name=cfg.name,
            output_dir=cfg.output_dir,
            run_dir=cfg.run_dir,
            config=config_to_dict(cfg),
            precision=precision,
            accum_steps=accum_steps,
            checkpoint=checkpoint,
            wandb=tracking.wandb,
            project=tracking.project,
            reads=reads,
            encoder=encoder,
        )


@dataclass(frozen=True)
class PlanSpec:
    """What `mae_et.run.plan.plan_run` reads: the budget and batch, the lr schedule, the log and checkpoint cadence."""

    epochs: float  # the budget: epochs, or full-size-epoch equivalents for a compute budget
    micro_batch: int  # images per process per micro-step
    accum_steps: int  # micro-steps per optimizer step
    max_steps: int | None  # where this launch stops early
    blr: float  # lr = blr * global_batch / 256 ...
    lr: float | None  # ... unless an absolute lr is given
    min_lr: float
    warmup_epochs: float
    log_every: int
    checkpoint: CheckpointConfig  # every_steps, else every_epochs

    @classmethod
    def of(cls, train: Any, optim: Any, checkpoint: CheckpointConfig, micro_batch: int, accum_steps: int) -> PlanSpec:
        """From a run config's `train` and `optim` sections (each config's own classes, with these fields)."""
        return cls(
            epochs=train.epochs,
            micro_batch=micro_batch,
            accum_steps=accum_steps,
            max_steps=train.max_steps,
            blr=optim.blr,
            lr=optim.lr,
            min_lr=optim.min_lr,
            warmup_epochs=optim.warmup_epochs,
            log_every=train.log_every,
            checkpoint=checkpoint,
        )


# ----------------------------------------------------------------------------- the rules every run config follows


def check_name(name: str) -> None:
    """The run folder is output_dir/name: a name (as resolved) is one folder name in it, never a path out of it
    ('..', '/x', 'a/b') nor output_dir itself ('.', blank)."""
    if not name.strip() or name in (".", "..") or "/" in name or "\0" in name:
        raise ConfigError(
            f"name {name!r} must be one folder name inside output_dir (not '.' or '..', no '/'); e.g. name=my_run"
        )


def check_warmup(plan: PlanSpec) -> None:
    """Warmup within the budget."""
    if plan.warmup_epochs > plan.epochs:
        raise ConfigError(f"optim.warmup_epochs must be in [0, train.epochs={plan.epochs}], got {plan.warmup_epochs}")


def check_min_lr(plan: PlanSpec) -> None:
    """A floor `optim.min_lr` above the lr would make the cosine climb; checked at one process's global batch,
    whose lr is the smallest the config can train with (more processes raise it)."""
    batch = plan.micro_batch * plan.accum_steps
    scaled = (plan.blr * batch / 256, f"optim.blr {plan.blr:g} x global batch {batch} / 256")
    lr, how = (plan.lr, "optim.lr") if plan.lr is not None else scaled
    if plan.min_lr > lr:
        raise ConfigError(
            f"optim.min_lr {plan.min_lr:g} is above the lr {lr:g} ({how}), so the schedule would climb to it instead "
            "of decaying; lower optim.min_lr (0 decays all the way) or raise the lr"
        )


def check_scale(key: str, scale: tuple[float, float]) -> None:
    """A RandomResizedCrop's area range (pretraining's data.scale, the evaluations' augment.scale)."""
    lo, hi = scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"{key} must satisfy 0 < min <= max <= 1, got {list(scale)}")
