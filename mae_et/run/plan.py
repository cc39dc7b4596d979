"""A run's plan in optimizer steps, one function for the three engines (pretraining, fine-tuning, linear probe).

The plan says how many images one optimizer step takes (the global batch), how many steps one pass over the data
is, where the curriculum's stages fall (`mae_et.curriculum.schedules.plan_curriculum`; a run without a curriculum
is one stage at full size), where this launch stops (`train.max_steps`), the learning rate of each step (warmup +
cosine over budget progress, so stage changes never restart or bend it) and when it logs and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mae_et.curriculum.schedules import CurriculumPlan, Stage, plan_curriculum
from mae_et.recipes import ConfigError
from mae_et.run.config import CheckpointConfig, PlanSpec


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
        """Every `every` steps and at the launch's last step; never when `every` is None (off)."""
        return every is not None and (step % every == 0 or step == self.end_step)

    def checkpoint_due(self, step: int) -> bool:
        """The checkpoint cadence, and the launch's last step even with checkpoints off."""
        return step == self.end_step or self.due(step, self.ckpt_every)


def plan_run(
    spec: PlanSpec, num_images: int, world: int, stages: Sequence[Stage], budget: str, full_size: int
) -> RunPlan:
    """The plan of a run over `num_images` images on `world` processes."""
    global_batch = spec.micro_batch * world * spec.accum_steps
    steps_per_epoch = optimizer_steps_per_epoch(num_images, spec.micro_batch, world, spec.accum_steps)
    plan = plan_curriculum(stages, budget, spec.epochs, steps_per_epoch, full_size)
    return RunPlan(
        plan=plan,
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        end_step=min(plan.total_steps, spec.max_steps or plan.total_steps),
        base_lr=spec.lr if spec.lr is not None else scaled_lr(spec.blr, global_batch),
        min_lr=spec.min_lr,
        warmup=spec.warmup_epochs / spec.epochs,
        log_every=spec.log_every,
        ckpt_every=checkpoint_every(spec.checkpoint, steps_per_epoch),
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


# ----------------------------------------------------------------------------- cadence


def steps_every(epochs: float, steps_per_epoch: int) -> int:
    return max(1, round(epochs * steps_per_epoch))


def checkpoint_every(c: CheckpointConfig, steps_per_epoch: int) -> int | None:
    """Optimizer steps between checkpoints: `checkpoint.every_steps`, else `checkpoint.every_epochs`; None when
    both are 0 (off: only the last step of the launch, the end or `train.max_steps`, is saved)."""
    if c.every_steps:
        return c.every_steps
    return steps_every(c.every_epochs, steps_per_epoch) if c.every_epochs > 0 else None


# ----------------------------------------------------------------------------- learning rate


def scaled_lr(blr: float, global_batch: int) -> float:
    """The MAE linear scaling rule: lr = blr * global_batch / 256."""
    return blr * global_batch / 256


def lr_at(progress: float, base_lr: float, min_lr: float, warmup: float) -> float:
    """Linear warmup over progress [0, warmup), then half-cosine from base_lr down to min_lr at 1."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup:
        return base_lr * progress / warmup
    span = 1.0 - warmup
    t = (progress - warmup) / span if span > 0 else 1.0
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group gets lr x its `lr_scale` (layer-wise decay in fine-tuning; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
