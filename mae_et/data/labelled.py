"""Labelled data for the evaluation stage: split folders, class checks, seeded training augmentation.

``data.root/<split>/<class>/<image>``; labels come from the training split's sorted class folders, and the
validation split must hold the same classes (checked by name before any model is built). Training batches are the
pretraining stream's (`StepSampler` keys, each augmentation a pure function of its sample seed), so resume is
exact; `build_eval_loader` (resize + centre crop; also the kNN's) is sharded across processes without padding.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import create_transform
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from mae_et.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageFolderIndex,
    StepSampler,
    load_rgb,
    scan_image_folder,
    step_loader,
)
from mae_et.notices import DataWarning
from mae_et.seeding import Family, replacement_seed, seed_global_rngs

# ----------------------------------------------------------------------------- splits and classes


def split_dir(root: str | Path, split: str, key: str) -> Path:
    """`root/split`, or a DataError naming the config key to fix."""
    path = Path(root) / split
    try:
        found_split = path.is_dir()
    except OSError as e:  # a root this user may not look into
        raise DataError(
            f"data.root '{root}' cannot be read ({e.strerror or e}); give this user read access or pass another "
            "data.root"
        ) from None
    if not found_split:
        found = (
            sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))
            if Path(root).is_dir()
            else []
        )
        raise DataError(
            f"data.root '{root}' has no '{split}' split folder (found: {', '.join(found) or 'nothing'}); "
            f"pass {key}=<one of those> or point data.root at the dataset"
        )
    return path


def scan_train_split(root: str | Path, split: str) -> ImageFolderIndex:
    """Index of the training split; num_classes = len(index.classes)."""
    return scan_image_folder(split_dir(root, split, "data.train_split"))


# ----------------------------------------------------------------------------- seeded augmentation


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) RNGs for the block, then restore them.

    timm's transforms draw from all three global RNGs; seeding them per sample makes an
    augmentation a function of the sample's seed, and restoring keeps the caller's streams intact
    (with num_workers=0 the caller is the training process itself).
    """
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_global_rngs(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededClassificationDataset(torch.utils.data.Dataset):
    """Keys ``(index, sample seed)`` -> ``(image (3, S, S) float32 normalised, label)``.

    An unreadable file is warned about once per worker and replaced by the next image (as in
    pretraining), so one bad JPEG does not stop a multi-day run; evaluation never does this.
    """

    def __init__(
        self, index: ImageFolderIndex, transform: Callable[[Image.Image], Tensor], max_consecutive_failures: int = 50
    ) -> None:
        self.index = index
        self.transform = transform
        self.max_consecutive_failures = max_consecutive_failures
        self._known_bad: set[str] = set()  # per worker process

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = int(key[0]), int(key[1])
        n = len(self.index.samples)
        for attempt in range(self.max_consecutive_failures):
            path, label = self.index.samples[(index + attempt) % n]
            if path in self._known_bad:
                continue
            try:
                img = load_rgb(path)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
                warnings.warn(
                    f"cannot decode '{path}' ({type(e).__name__}: {e}); using the next image instead", DataWarning
                )
                self._known_bad.add(path)
                continue
            with seeded_rng(replacement_seed(Family.LABELLED_RETRY, seed, attempt)):
                return self.transform(img), label  # (3, S, S) float32
        raise DataError(
            f"{self.max_consecutive_failures} consecutive unreadable files near '{self.index.samples[index][0]}'; "
            "check data.root"
        )


def finetune_train_transform(
    img_size: int,
    auto_augment: str | None,
    scale: tuple[float, float],
    color_jitter: float | None,
    interpolation: str,
    reprob: float,
    remode: str,
    recount: int,
) -> Callable[[Image.Image], Tensor]:
    """The MAE fine-tuning transform: RandomResizedCrop + flip + RandAugment + normalise + RandomErasing."""
    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=scale,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation,
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def linprobe_train_transform(img_size: int, scale: tuple[float, float], hflip: bool) -> Callable[[Image.Image], Tensor]:
    """The MAE linear-probe transform: RandomResizedCrop (bicubic) + flip + normalise, nothing else."""
    steps: list[Callable] = [T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def build_train_loader(
    dataset: SeededClassificationDataset,
    micro_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    start_micro_step: int,
    num_micro_steps: int,
    num_workers: int,
    pin_memory: bool,
) -> torch.utils.data.DataLoader:
    """A finite slice of the seeded stream: micro-steps [start, start + num) of this rank. A new loader per epoch
    (the transform may change), so its workers live for one epoch."""
    sampler = StepSampler(len(dataset), micro_batch, rank, world_size, seed, start_micro_step, num_micro_steps)
    return step_loader(dataset, sampler, num_workers, pin_memory, collate_fn=None, persistent_workers=False)


# ----------------------------------------------------------------------------- evaluation sharding


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous shard of range(n) for `rank`; shards differ in size by at most one and never overlap."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_loader(loader: torch.utils.data.DataLoader, rank: int, world_size: int) -> torch.utils.data.DataLoader:
    """The same loader over this rank's contiguous shard of its dataset, in order, no padding.

    Accelerate's prepared loaders pad the last batch with repeated samples; summing correct
    counts over ranks would then count those twice. Disjoint shards keep the sum exact.
    """
    if world_size == 1:
        return loader
    subset = torch.utils.data.Subset(loader.dataset, list(shard_range(len(loader.dataset), rank, world_size)))
    return torch.utils.data.DataLoader(
        subset,
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
    )


# ----------------------------------------------------------------------------- evaluation view


class EvalImageFolder(Dataset):
    """Deterministic eval view of an ImageFolder: resize the short side, centre crop, normalise.

    An undecodable file yields None (warned once) and is dropped by ``collate_eval``, the way
    pretraining skips bad files instead of stopping.
    """

    def __init__(self, index: ImageFolderIndex, img_size: int, label_of: list[int]) -> None:
        self.index = index
        self.classes = index.classes
        self.img_size = img_size
        # The usual 0.875 crop ratio: resize to img_size*256/224, then centre crop img_size.
        self.resize_size = int(img_size * 256 / 224)
        self.label_of = label_of  # folder index in this split -> label in the reference mapping
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)  # (3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)  # (3, 1, 1)

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        path, folder_label = self.index.samples[i]
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            warnings.warn(f"cannot decode '{path}' ({type(e).__name__}: {e}); skipping it", DataWarning)
            return None
        img = TF.resize(img, [self.resize_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [self.img_size, self.img_size])
        x = TF.pil_to_tensor(img).float().div_(255.0)  # (3, S, S) in [0, 1]
        x = (x - self.mean) / self.std  # (3, S, S)
        return x, self.label_of[folder_label]


def collate_eval(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor]:
    good = [it for it in items if it is not None]
    if not good:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, dtype=torch.int64)
    images = torch.stack([it[0] for it in good])  # (B, 3, S, S)
    labels = torch.tensor([it[1] for it in good], dtype=torch.int64)  # (B,)
    return images, labels


def build_eval_loader(
    root: str | Path,
    img_size: int,
    batch_size: int,
    num_workers: int,
    classes: list[str] | None = None,
) -> DataLoader:
    """Ordered DataLoader of (images (B, 3, S, S) float, labels (B,)) for an ImageFolder split.

    ``classes`` (the train split's class list) fixes the label of each class folder, so that
    train and val agree; every listed class must exist here and no other.
    ``loader.dataset.classes`` is the class list the labels index.
    """
    index = scan_image_folder(root)
    if classes is None:
        label_of = list(range(len(index.classes)))
    else:
        missing = [c for c in classes if c not in index.classes]
        extra = [c for c in index.classes if c not in classes]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks the classes {', '.join(missing)}")
            if extra:
                parts.append(f"has classes the train split lacks: {', '.join(extra)}")
            raise DataError(f"split '{root}' {' and '.join(parts)}; both splits need the same class folders")
        position = {c: i for i, c in enumerate(classes)}
        label_of = [position[c] for c in index.classes]
        index = ImageFolderIndex(root=index.root, classes=list(classes), samples=index.samples, skipped=index.skipped)
    dataset = EvalImageFolder(index, img_size, label_of)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
        drop_last=False,
    )
