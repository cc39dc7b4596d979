"""Optimizer and learning-rate schedule for MAE pretraining.

AdamW with betas (0.9, 0.95); no weight decay on biases, norms (1-D parameters) or the
cls/mask tokens (timm's grouping, plus the model's `no_weight_decay()` names). One continuous
warmup + half-cosine learning rate over *budget progress* in [0, 1], so curriculum stage changes
never restart or bend the schedule.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay


def scaled_lr(blr: float, global_batch: int) -> float:
    """The MAE linear scaling rule: lr = blr * global_batch / 256."""
    return blr * global_batch / 256


def build_adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    # fused AdamW: one kernel for all parameters, and it honours `found_inf`, which lets the
    # training step skip a non-finite update on the device without a host sync.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


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
