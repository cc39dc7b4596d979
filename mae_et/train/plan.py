"""A run's plan in optimizer steps, one function for the three engines (pretraining, fine-tuning, linear probe).

The plan says how many images one optimizer step takes (the global batch), how many steps one pass over the data
is, where the curriculum's stages fall (`mae_et.curriculum.schedules.plan_curriculum`; a run without a curriculum
is one stage at full size), where this launch stops (`train.max_steps`), the learning rate of each step (warmup +
cosine over budget progress) and when it logs and checkpoints. The probe has no curriculum and no accumulation:
it passes its one stage and its per-process batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mae_et.curriculum.schedules import CurriculumPlan, Stage, plan_curriculum
from mae_et.recipes import ConfigError
from mae_et.train.optim import lr_at, scaled_lr
from mae_et.train.run import checkpoint_every


@dataclass(frozen=True)
class RunPlan:
    plan: CurriculumPlan  # the stages laid out in optimizer steps
    global_batch: int  # images per optimizer step: micro-batch x processes x accumulation steps
    steps_per_epoch: int  # optimizer steps per pass over the data (the tail of each pass is dropped)
    end_step: int  # where this launch stops: the plan's end, or train.max_steps
    base_lr: float
    min_lr: float
    warmup: float  # in budget progress
    log_every: int
    ckpt_every: int | None  # None: off, only the launch's last step

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def num_epochs(self) -> int:
        """Passes over the data the whole plan starts (the last may be cut short by the plan's end)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def lr(self, step: int) -> float:
        return lr_at(self.plan.progress_at_step(step), self.base_lr, self.min_lr, self.warmup)

    def due(self, step: int, every: int | None) -> bool:
        return every is not None and (step % every == 0 or step == self.end_step)


def plan_run(
    cfg,
    num_images: int,
    world: int,
    stages: Sequence[Stage],
    budget: str,
    full_size: int,
    micro_batch: int | None = None,
) -> RunPlan:
    """The plan of a run of `cfg` (any run config with `train`, `optim` and `checkpoint`) over `num_images`
    images on `world` processes. `micro_batch` defaults to `train.batch_size` (per process); accumulation
    steps to `train.accum_steps` (1 where the config has none)."""
    micro_batch = micro_batch or cfg.train.batch_size
    accum = getattr(cfg.train, "accum_steps", 1)
    global_batch = micro_batch * world * accum
    steps_per_epoch = optimizer_steps_per_epoch(num_images, micro_batch, world, accum)
    plan = plan_curriculum(stages, budget, cfg.train.epochs, steps_per_epoch, full_size)
    o = cfg.optim
    return RunPlan(
        plan=plan,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        end_step=min(plan.total_steps, cfg.train.max_steps or plan.total_steps),
        base_lr=o.lr if o.lr is not None else scaled_lr(o.blr, global_batch),
        min_lr=o.min_lr,
        warmup=o.warmup_epochs / cfg.train.epochs,
        log_every=cfg.train.log_every,
        ckpt_every=checkpoint_every(cfg, steps_per_epoch),
    )


def optimizer_steps_per_epoch(num_images: int, micro_batch: int, world: int, accum: int) -> int:
    """Optimizer steps in one pass over `num_images`; a ConfigError when there is not one full step."""
    steps = num_images // (micro_batch * world) // accum
    if steps == 0:
        raise ConfigError(
            f"{num_images} training images make no full optimizer step of global batch {micro_batch * world * accum} "
            f"(train.batch_size x processes x train.accum_steps); lower train.batch_size or train.accum_steps"
        )
    return steps


def one_stage(full_size: int) -> tuple[list[Stage], str]:
    """The plan of a run without a curriculum: every step at full size."""
    return [Stage(size=full_size, fraction=1.0)], "epochs"
