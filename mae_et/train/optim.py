"""Pretraining's optimizer: AdamW with betas (0.9, 0.95) and no weight decay on biases, norms (1-D parameters) or
the cls/mask tokens (timm's grouping, plus the model's `no_weight_decay()` names). Its learning rate per step is
the run's plan (`mae_et.run.plan`).
"""

from __future__ import annotations

import torch
from timm.optim import param_groups_weight_decay


def build_adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    # fused AdamW: one kernel for all parameters, and it honours `found_inf`, which lets the
    # training step skip a non-finite update on the device without a host sync.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
