"""How a checkpoint's weights differ from a model's: the one key-and-shape comparison every loader reports from.

The official MAE loader, the ViT encoder loader, resuming a run and the visualize CLI all compare a state dict with
the model it is meant for before loading it, and say in their own message what is missing, what is extra and which
shapes differ, instead of load_state_dict's traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = ["KeyMismatch", "compare_state", "fmt_shape", "is_decoder_key"]


def is_decoder_key(name: str) -> bool:
    """A MAE decoder weight; mask_token too: only the decoder uses it, so encoder-only releases do not carry it."""
    return name.startswith("decoder_") or name == "mask_token"


def fmt_shape(shape: torch.Size | tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


@dataclass
class KeyMismatch:
    missing: list[str]  # in the model, not in the checkpoint (sorted)
    unexpected: list[str]  # in the checkpoint, not in the model (sorted)
    shapes: list[str]  # "name: checkpoint (a, b) vs model (c, d)" (sorted)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def lines(self) -> list[str]:
        """One line per kind that occurs, every name listed (the loaders' multi-line errors)."""
        out = []
        if self.missing:
            out.append("missing keys: " + ", ".join(self.missing))
        if self.unexpected:
            out.append("unexpected keys: " + ", ".join(self.unexpected))
        if self.shapes:
            out.append("shape mismatches: " + "; ".join(self.shapes))
        return out

    def summary(self, shown: int = 4) -> str:
        """All kinds in one line, the first `shown` names of each (the command-line errors)."""
        parts = []
        for label, names in (
            ("shapes", self.shapes),
            ("not in the checkpoint", self.missing),
            ("only in the checkpoint", self.unexpected),
        ):
            if names:
                more = f" and {len(names) - shown} more" if len(names) > shown else ""
                parts.append(f"{label}: " + ", ".join(names[:shown]) + more)
        return "; ".join(parts)


def compare_state(
    checkpoint: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    may_be_missing: Iterable[str] = (),
    may_be_unexpected: Iterable[str] = (),
) -> KeyMismatch:
    """checkpoint's keys and shapes against model's; names in may_be_* are not counted as missing / unexpected."""
    missing = sorted(set(model) - set(checkpoint) - set(may_be_missing))
    unexpected = sorted(set(checkpoint) - set(model) - set(may_be_unexpected))
    shapes = sorted(
        f"{k}: checkpoint {fmt_shape(checkpoint[k].shape)} vs model {fmt_shape(model[k].shape)}"
        for k in set(checkpoint) & set(model)
        if tuple(checkpoint[k].shape) != tuple(model[k].shape)
    )
    return KeyMismatch(missing, unexpected, shapes)
