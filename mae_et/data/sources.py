"""Where pretraining images come from: five sources behind one call, chosen by name from the config.

    source = open_source(cfg.data, seed, main, device)   # once per process: scan, decode-once store, ...
    batches = source.batches(rank, world, micro_batch, start_micro_step, num_micro_steps)  # PretrainBatch, ...

`data.pipeline` picks loader (PIL in workers), memory (decoded once, cropped on the device) or device_decode
(decoded on the device); `data.source` fractal or shards replaces the folder. Every stream is the `StepSampler`'s,
a pure function of (seed, micro-step, rank): a run resumes at any micro-step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mae_et.data.device_decode import DeviceDecodeBatchSource
from mae_et.data.folder import (
    DataError,
    ImageFolderIndex,
    PretrainBatch,
    PretrainDataset,
    StepSampler,
    scan_image_folder,
    step_loader,
)
from mae_et.data.fractal import FractalBatchSource, FractalDataset
from mae_et.data.on_device import InMemoryImages, MemoryBatchSource
from mae_et.data.shard_index import open_shards
from mae_et.notices import RunWarning

# Sub-folders that hold held-out images: a root with one of them is a root of splits, never a training folder
HELD_OUT_SPLITS = ("val", "validation", "valid", "test")


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def data_dir(d) -> Path:
    """The folder to pretrain on: `data.root/data.split`; the root itself when `data.split` is empty, or when the
    default `train` is absent from a root of classes. A split that is not there, or a folder holding a held-out
    split (`val/`, `test/`, ...), is a one-line `DataError` naming the sub-folders: either would train on `val/` as a
    class. The config check calls it on load, and every source that reads a folder opens it through here."""
    try:
        return _data_dir(d)
    except PermissionError as e:
        raise DataError(
            f"data.root: '{e.filename}' cannot be read ({e.strerror}); give this user read access"
        ) from None


def _data_dir(d) -> Path:
    root = Path(d.root)
    if not root.is_dir():
        return root  # (a missing root: the scan says so)
    folder = root / d.split if d.split else root
    if not folder.is_dir():
        subfolders = _subfolders(root)
        held_out = [name for name in subfolders if name.lower() in HELD_OUT_SPLITS]
        if d.split == "train" and not held_out:
            return root  # a plain ImageFolder of classes
        shown = ", ".join(subfolders[:8]) + (f" and {len(subfolders) - 8} more" if len(subfolders) > 8 else "")
        way_on = (
            "pass data.split=<one of them>"
            if held_out
            else "pass data.split='' to pretrain on the root itself (a folder of classes), "
            "or data.split=<the folder to use>"
        )
        raise DataError(
            f"data.split '{d.split}' is not a folder under '{root}' (its sub-folders: {shown or 'none'}); {way_on}"
        )
    held_out = [name for name in _subfolders(folder) if name.lower() in HELD_OUT_SPLITS]
    if held_out:
        way_on = "data.split=train" if (folder / "train").is_dir() else "data.split=<the folder of training classes>"
        raise DataError(
            f"data.split '{d.split}' would pretrain on all of '{folder}', which holds {held_out[0]}/ (held-out "
            f"images, never trained on); pass {way_on}"
        )
    return folder


def check_splits_apart(train: Path, train_key: str, held_out: Path, held_out_key: str) -> None:
    """The images a model learns from (a training split, a kNN bank) and the ones it is scored on are two
    separate folders, neither inside the other: else the score is measured on training images. The one check
    of fine-tuning, the linear probe, the pretraining kNN monitor and `mae-et knn`."""
    a, b = train.resolve(), held_out.resolve()
    if a == b:
        how = "are the same folder"
    elif a in b.parents or b in a.parents:
        how = f"overlap ('{b if a in b.parents else a}' is inside '{a if a in b.parents else b}')"
    else:
        return
    raise DataError(
        f"{train_key} ('{train}') and {held_out_key} ('{held_out}') {how}: the held-out score would be measured "
        "on training images; pass two separate sub-folders of the data root, e.g. train and val"
    )


def _scan(d, main: bool) -> ImageFolderIndex:
    with warnings.catch_warnings():
        if not main:  # scan-time warnings once, from the main rank
            warnings.simplefilter("ignore")
        return scan_image_folder(data_dir(d), strict=d.strict)  # a directory listing: no decoding


@dataclass
class PretrainSource:
    """What every source holds: `dataset` (a map-style view of its images: the fixed reconstruction images come
    from it), `num_images` an epoch draws from, the files `skipped` while opening, and `batches`."""

    d: Any  # the config's data section
    seed: int
    device: torch.device
    dataset: Dataset

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list:
        return []

    def batches(
        self,
        rank: int,
        world: int,
        micro_batch: int,
        start_micro_step: int,
        num_micro_steps: int | None,
        size_at: Callable[[int], int] | None = None,
    ) -> Iterator[PretrainBatch]:
        """This rank's micro-batches from `start_micro_step` on. size_at (global micro-step -> B, data.decode_size=
        stage, which the schema allows with the loader only) has the workers crop straight to B."""
        sampler = StepSampler(
            self.num_images, micro_batch, rank, world, self.seed, start_micro_step, num_micro_steps, size_at
        )
        return self.stream(sampler)

    def stream(self, sampler: StepSampler) -> Iterator[PretrainBatch]:
        """The keys decoded and cropped in DataLoader workers (pinned batches for a GPU)."""
        pin_memory = self.d.pin_memory and self.device.type == "cuda"
        return iter(step_loader(self.dataset, sampler, self.d.num_workers, pin_memory))


@dataclass
class FolderSource(PretrainSource):
    """data.pipeline=loader: PIL decode and crop in DataLoader workers."""

    index: ImageFolderIndex  # or a ShardIndex: the same samples and read(i)

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> FolderSource:
        return cls._of(d, seed, device, _scan(d, main))

    @classmethod
    def _of(cls, d, seed: int, device: torch.device, index, **more) -> FolderSource:
        dataset = PretrainDataset(index, crop_size=d.crop_size, scale=d.scale, hflip=d.hflip, strict=d.strict)
        return cls(d=d, seed=seed, device=device, dataset=dataset, index=index, **more)

    @property
    def skipped(self) -> list:
        return list(self.index.skipped)


@dataclass
class MemorySource(FolderSource):
    """data.pipeline=memory: decoded once (short side `data.memory_size`, on the GPU when it fits), cropped there."""

    store: InMemoryImages | None = None

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> MemorySource:
        index = _scan(d, main)
        on_device = d.memory_on_device and device.type == "cuda"
        with warnings.catch_warnings():
            if not main:
                warnings.simplefilter("ignore")
            store = InMemoryImages(
                index,
                d.memory_size or round(d.crop_size * 256 / 224),
                device if on_device else "cpu",
                strict=d.strict,
                num_workers=d.num_workers,
                pin_memory=device.type == "cuda" and not on_device,
                progress=main,
            )
        return cls._of(d, seed, device, index, store=store)

    @property
    def num_images(self) -> int:
        return len(self.store)

    @property
    def skipped(self) -> list:
        return list(self.index.skipped) + list(self.store.skipped)

    def stream(self, sampler: StepSampler) -> Iterator[PretrainBatch]:
        d = self.d
        return MemoryBatchSource(self.store, sampler, d.crop_size, scale=d.scale, hflip=d.hflip, device=self.device)


@dataclass
class DeviceDecodeSource(FolderSource):
    """data.pipeline=device_decode: workers read bytes, the device decodes (CPU fallback per file) and crops."""

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> DeviceDecodeSource:
        if device.type != "cuda" and main:  # said once, when the run opens its data: not silently slower
            warnings.warn(
                "data.pipeline=device_decode has no GPU here: JPEGs are decoded on the CPU, in the main "
                "process; data.pipeline=loader decodes in data.num_workers worker processes instead",
                RunWarning,
                stacklevel=2,
            )
        return super().open(d, seed, main, device)

    def stream(self, sampler: StepSampler) -> Iterator[PretrainBatch]:
        d = self.d
        return DeviceDecodeBatchSource(
            self.index,
            sampler,
            d.crop_size,
            self.device,
            scale=d.scale,
            hflip=d.hflip,
            strict=d.strict,
            num_workers=d.num_workers,
        )


@dataclass
class ShardSource(FolderSource):
    """data.source=shards: tar shards (mae_et.data.shards) read by random access, decoded and cropped in the
    loader's workers exactly as the folder's files are: the same keys, crops, resume and bad-sample counting."""

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> ShardSource:
        return cls._of(d, seed, device, open_shards(d.root, d.shard_cache))


@dataclass
class FractalSource(PretrainSource):
    """data.source=fractal: renders, batched on the GPU when there is one, else in DataLoader workers."""

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> FractalSource:
        dataset = FractalDataset(d.fractal_classes, d.fractal_images_per_class, d.crop_size, seed=seed, split="train")
        return cls(d=d, seed=seed, device=device, dataset=dataset)

    def stream(self, sampler: StepSampler) -> Iterator[PretrainBatch]:
        if self.device.type == "cuda":
            return FractalBatchSource(self.dataset, sampler, self.device)
        return super().stream(sampler)


SOURCES: dict[str, type] = {
    "loader": FolderSource,
    "memory": MemorySource,
    "device_decode": DeviceDecodeSource,
    "fractal": FractalSource,
    "shards": ShardSource,
}


def source_name(d) -> str:
    """The source a data section asks for: `fractal` or `shards` (data.source), else its `data.pipeline`."""
    return d.source if d.source in ("fractal", "shards") else d.pipeline


def open_source(d, seed: int, main: bool, device: torch.device) -> PretrainSource:
    return SOURCES[source_name(d)].open(d, seed, main, device)
