"""Where pretraining images come from: one small protocol, five sources, chosen by name from the config.

    source = open_source(cfg.data, seed, main, device)   # once per process: scan, decode-once store, ...
    batches = source.batches(rank, world, micro_batch, start_micro_step, num_micro_steps)
    next(batches)  # PretrainBatch: uint8 crops (n, 3, S, S), labels (n,), names of files that failed to decode

Every source gives a rank the same deterministic stream, a pure function of (seed, micro-step, rank), so a
run resumes from any micro-step and the ranks never share an image. What else a source holds:
    dataset      a map-style view of the same images (the fixed reconstruction images come from it)
    num_images   how many images an epoch draws from
    skipped      files skipped while opening (named, with the reason)

The five (`data.pipeline`, or `data.source: fractal | shards`):
    loader         PIL decode + random-resized crop in DataLoader workers: portable, the default
    memory         every image decoded once into a store (uint8, short side `data.memory_size`), cropped
                   batched on the device
    device_decode  JPEG bytes read by workers, decoded on the device (nvjpeg), cropped batched there
    fractal        iterated-function-system renders, generated per (class, index, seed): no files at all
    shards         tar shards (local or http(s)) read by random access, decoded in workers as the loader's files

The config sections are read by attribute (`data.crop_size`, ...): this module imports no config class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

from mae_et.data.folder import (
    DataError,
    ImageFolderIndex,
    PretrainBatch,
    PretrainDataset,
    build_pretrain_loader,
    scan_image_folder,
)
from mae_et.data.fractal import FractalBatchSource, FractalDataset
from mae_et.data.on_device import DeviceDecodeBatchSource, InMemoryImages, MemoryBatchSource
from mae_et.data.shard_index import open_shards
from mae_et.notices import RunWarning


class PretrainSource(Protocol):
    dataset: Dataset
    num_images: int
    skipped: list

    def batches(
        self,
        rank: int,
        world: int,
        micro_batch: int,
        start_micro_step: int,
        num_micro_steps: int,
        size_at: Callable[[int], int] | None = None,
    ) -> Iterator[PretrainBatch]: ...


def _crops_at_crop_size(source, size_at) -> None:
    """Only the loader crops to the stage's size (the config check keeps data.decode_size=stage to it)."""
    if size_at is not None:
        raise DataError(
            f"{type(source).__name__} crops at data.crop_size only; data.decode_size=stage needs the loader"
        )


# Sub-folders that hold held-out images: a root with one of them is a root of splits, never a training folder
HELD_OUT_SPLITS = ("val", "validation", "valid", "test")


def _subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def data_dir(d) -> Path:
    """The folder to pretrain on: `data.root/data.split`; the root itself when `data.split` is empty, or when
    the default `train` is absent from a root that is itself a folder of classes. Every source that reads a
    folder opens it through here, and the config check calls it on load. A root this user may not read is one
    line too.

    A split that is not there, or a folder that holds a held-out split (`val/`, `test/`, ...: `data.split=''` on
    a root of `train/` and `val/`), is a `DataError` naming the sub-folders that are: either would train on
    `train/` and `val/` as two classes, the evaluation images among them."""
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
class FolderSource:
    """data.pipeline=loader: PIL decode and crop in DataLoader workers (pinned CPU batches)."""

    d: Any
    seed: int
    device: torch.device
    index: ImageFolderIndex
    dataset: PretrainDataset

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> FolderSource:
        index = _scan(d, main)
        return cls(
            d,
            seed,
            device,
            index,
            PretrainDataset(index, crop_size=d.crop_size, scale=d.scale, hflip=d.hflip, strict=d.strict),
        )

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> list:
        return list(self.index.skipped)

    def batches(
        self, rank, world, micro_batch, start_micro_step, num_micro_steps, size_at=None
    ) -> Iterator[PretrainBatch]:
        """size_at (data.decode_size=stage): global micro-step -> B; the workers then decode at reduced scale and
        crop straight to B (`PretrainDataset.crop_at_size`)."""
        return iter(
            build_pretrain_loader(
                self.dataset,
                micro_batch=micro_batch,
                rank=rank,
                world_size=world,
                seed=self.seed,
                num_workers=self.d.num_workers,
                pin_memory=self.d.pin_memory and self.device.type == "cuda",
                start_micro_step=start_micro_step,
                num_micro_steps=num_micro_steps,
                size_at=size_at,
            )
        )


@dataclass
class MemorySource(FolderSource):
    """data.pipeline=memory: decoded once (short side `data.memory_size`, on the GPU when it fits), cropped there."""

    store: InMemoryImages | None = None

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> MemorySource:
        folder = FolderSource.open(d, seed, main, device)
        on_device = d.memory_on_device and device.type == "cuda"
        with warnings.catch_warnings():
            if not main:
                warnings.simplefilter("ignore")
            store = InMemoryImages(
                folder.index,
                d.memory_size or round(d.crop_size * 256 / 224),
                device if on_device else "cpu",
                strict=d.strict,
                num_workers=d.num_workers,
                pin_memory=device.type == "cuda" and not on_device,
                progress=main,
            )
        return cls(d, seed, device, folder.index, folder.dataset, store)

    @property
    def num_images(self) -> int:
        return len(self.store)

    @property
    def skipped(self) -> list:
        return list(self.index.skipped) + list(self.store.skipped)

    def batches(
        self, rank, world, micro_batch, start_micro_step, num_micro_steps, size_at=None
    ) -> Iterator[PretrainBatch]:
        _crops_at_crop_size(self, size_at)
        return MemoryBatchSource(
            self.store,
            micro_batch,
            rank,
            world,
            self.seed,
            self.d.crop_size,
            scale=self.d.scale,
            hflip=self.d.hflip,
            device=self.device,
            start_micro_step=start_micro_step,
            num_micro_steps=num_micro_steps,
        )


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

    def batches(
        self, rank, world, micro_batch, start_micro_step, num_micro_steps, size_at=None
    ) -> Iterator[PretrainBatch]:
        _crops_at_crop_size(self, size_at)
        return DeviceDecodeBatchSource(
            self.index,
            micro_batch,
            rank,
            world,
            self.seed,
            self.d.crop_size,
            self.device,
            scale=self.d.scale,
            hflip=self.d.hflip,
            strict=self.d.strict,
            num_workers=self.d.num_workers,
            start_micro_step=start_micro_step,
            num_micro_steps=num_micro_steps,
        )


@dataclass
class FractalSource:
    """data.source=fractal: renders, batched on the GPU when there is one, else in DataLoader workers."""

    d: Any
    seed: int
    device: torch.device
    dataset: FractalDataset
    skipped: list = field(default_factory=list)  # nothing to skip: no files

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> FractalSource:
        return cls(
            d,
            seed,
            device,
            FractalDataset(d.fractal_classes, d.fractal_images_per_class, d.crop_size, seed=seed, split="train"),
        )

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def batches(
        self, rank, world, micro_batch, start_micro_step, num_micro_steps, size_at=None
    ) -> Iterator[PretrainBatch]:
        _crops_at_crop_size(self, size_at)
        stream = dict(start_micro_step=start_micro_step, num_micro_steps=num_micro_steps)
        if self.device.type == "cuda":
            return FractalBatchSource(self.dataset, micro_batch, rank, world, self.seed, self.device, **stream)
        return iter(
            build_pretrain_loader(
                self.dataset,
                micro_batch=micro_batch,
                rank=rank,
                world_size=world,
                seed=self.seed,
                num_workers=self.d.num_workers,
                pin_memory=False,
                **stream,
            )
        )


@dataclass
class ShardSource(FolderSource):
    """data.source=shards: tar shards (mae_et.data.shards) read by random access, decoded and cropped in the
    loader's workers exactly as the folder's files are: the same keys, crops, resume and bad-sample counting."""

    @classmethod
    def open(cls, d, seed: int, main: bool, device: torch.device) -> ShardSource:
        index = open_shards(d.root, d.shard_cache)
        dataset = PretrainDataset(index, crop_size=d.crop_size, scale=d.scale, hflip=d.hflip, strict=d.strict)
        return cls(d, seed, device, index, dataset)


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
