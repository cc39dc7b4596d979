"""Seeds as pure functions of where they are used: one hash (`mix64`), the one table of seed families, and the
two uses every stage shares (a replacement image's seed, seeding the global RNGs).

Every random stream seeds its own `torch.Generator` with `mix64(family, seed, position...)`, so any step can be
recomputed on its own (a resumed run, another rank or worker draws what an uninterrupted run draws); each family
has its own tag, listed here once, so no two streams share one by accident (docs/design.md, "Seeds are pure
functions of position").
"""

from __future__ import annotations

import random
from enum import IntEnum, unique

import numpy as np
import torch

__all__ = ["Family", "mix64", "replacement_seed", "seed_global_rngs"]

_MASK32 = (1 << 32) - 1  # numpy seeds are 32-bit
_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


@unique
class Family(IntEnum):
    """The first value hashed into every seed: which stream it is for. The numbers are part of every run's draws
    (changing one changes every run that uses it), so they only ever get added to."""

    EPOCH_ORDER = 1  # mae_et.data.folder: the permutation of an epoch
    SAMPLE = 2  # mae_et.data.folder: one sample's crop and flip
    RETRY = 3  # mae_et.data.folder: the replacement of an unreadable file
    STEP_AUGMENT = 4  # mae_et.data.on_device: the crops and flips of one micro-step on the device
    # mae_et.data.labelled: the augmentation of an image that replaces an unreadable file (it was seed + attempt
    # before; only such a replacement draws differently, and no published run met one)
    LABELLED_RETRY = 5
    FRACTAL_SYSTEM = 101  # mae_et.data.fractal: drawing an iterated function system
    FRACTAL_STREAM = 102  # mae_et.data.fractal: the chaos game's points
    FRACTAL_STYLE = 103  # mae_et.data.fractal: colours and background
    FRACTAL_DATASET_SYSTEM = 104  # mae_et.data.fractal: each class's system
    FRACTAL_DATASET_SAMPLE = 105  # mae_et.data.fractal: each rendered sample
    FRACTAL_FILTER = 106  # mae_et.data.fractal: the filter that rejects degenerate systems
    MASK = 201  # mae_et.train.pretrain: the mask noise of one micro-step on one rank
    FINETUNE_STEP = 301  # mae_et.evaluate.finetune: the global RNGs of one micro-step (Mixup, drop path)


def mix64(*values: int) -> int:
    """Deterministic 63-bit hash of a tuple of ints (splitmix64 finaliser, chained): a linear formula such as
    `seed * K + epoch * M + pos` collides once a data set has more than M images; 63 bits fit `manual_seed`."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = h ^ (h >> 31)
    return h & _MASK63


def replacement_seed(family: Family, seed: int, attempt: int) -> int:
    """The seed of the image read `attempt` files past an unreadable one: the key's own at attempt 0, else a fresh
    one of `family`, so that a replacement is not a copy of another key's augmentation."""
    return seed if attempt == 0 else mix64(family, seed, attempt)


def seed_global_rngs(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU) global RNGs, which timm's transforms, Mixup and drop path draw from."""
    random.seed(seed)
    np.random.seed(seed & _MASK32)
    torch.manual_seed(seed)
