"""LARS (You et al. 2017), the optimizer of the MAE / MoCo-v3 linear probe: momentum SGD whose weight matrices
(ndim > 1) get weight decay and a trust ratio, trust_coefficient * ||p|| / ||g||, so that each one's step is
relative to its own norm, which lets the probe train with the reference's 16k batches; 1-D parameters get neither.
The update, step by step: docs/design.md, "LARS"."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"LARS weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1), got {momentum}")
        if trust_coefficient <= 0:
            raise ValueError(f"LARS trust_coefficient must be > 0, got {trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            momentum, trust = group["momentum"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=wd)  # new tensor: p.grad itself stays the raw gradient
                    p_norm = torch.linalg.vector_norm(p)  # () kept on device: no host sync
                    g_norm = torch.linalg.vector_norm(g)  # ()
                    ratio = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        trust * p_norm / g_norm.clamp_min(torch.finfo(g_norm.dtype).tiny),
                        torch.ones_like(p_norm),
                    )  # (); the clamp only avoids a 0/0 NaN in the branch that torch.where discards
                    g = g.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(momentum).add_(g)
                p.add_(mu, alpha=-lr)
        return loss
