"""The portable data path: ImageFolder scan, seeded PIL crops, the step sampler and the loader around it.

`StepSampler` gives each rank its keys `(image index, sample seed)` as a pure function of (seed, micro-step, rank),
so a run resumes at any micro-step with any number of workers; `step_loader` is the one DataLoader around it, which
every worker-fed source uses. `PretrainDataset[key]` is a uint8 crop; normalisation runs later on the device
(`normalize_on_device`). The stream's layout: docs/design.md, "The data stream".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode

from mae_et.errors import UserError
from mae_et.notices import DataWarning
from mae_et.seeding import Family, mix64, replacement_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UserError, ValueError):
    """A data problem the user must fix; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str  # e.g. "zero-byte file", "not an image extension", "cannot decode: <PIL error>"


@dataclass
class ImageFolderIndex:
    root: str
    classes: list[str]  # sorted class-folder names; label = position in this list
    samples: list[tuple[str, int]]  # (path, class index), sorted by path
    skipped: list[SkippedFile]  # found at scan time (decode failures are found later, per worker)

    def read(self, i: int) -> str:
        """What PIL opens for sample i: its path (a shard set gives the bytes: mae_et.data.shards)."""
        return self.samples[i][0]


def epoch_permutation_seed(seed: int, epoch: int) -> int:
    return mix64(Family.EPOCH_ORDER, seed, epoch)


def sample_seed_for(seed: int, epoch: int, position: int) -> int:
    return mix64(Family.SAMPLE, seed, epoch, position)


_QUIET_REASONS = ("hidden file", "hidden folder", "not inside a class folder")


def scan_image_folder(root: str | Path, strict: bool = False) -> ImageFolderIndex:
    """Index an ImageFolder tree (``root/<class>/**/<image>``) without decoding anything.

    Hidden files and folders, non-image extensions and zero-byte files are skipped and listed in ``skipped``;
    ``strict=True`` makes a bad file inside a class folder a ``DataError`` (hidden files and files directly in
    ``root`` never are: they are OS or bookkeeping clutter, not broken samples)."""
    root_str = os.fspath(root)
    if not os.path.isdir(root_str):
        what = "is a file, not a folder" if os.path.exists(root_str) else "does not exist"
        raise DataError(
            f"data root '{root_str}' {what}; pass data.root=/path/to/imagefolder (a folder of class sub-folders)"
        )

    skipped: list[SkippedFile] = []
    class_dirs: list[tuple[str, str]] = []  # (class name, path)
    try:
        with os.scandir(root_str) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:  # a root this user may not list
        raise DataError(
            f"data root '{root_str}' cannot be read ({e.strerror or e}); give this user read access or pass "
            "another data.root"
        ) from None
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:  # a symlink loop: not a class folder
            is_dir = False
        if entry.name.startswith("."):
            if not is_dir:
                skipped.append(SkippedFile(entry.path, "hidden file"))
            continue  # hidden folders (.git, .cache, ...) are not classes
        if is_dir:
            class_dirs.append((entry.name, entry.path))
        else:
            skipped.append(SkippedFile(entry.path, "not inside a class folder"))

    if not class_dirs:
        raise DataError(
            f"data root '{root_str}' has no class sub-folders; expected the ImageFolder layout "
            f"'{root_str}/<class>/<image>.JPEG' (pass data.root=/path/to/imagefolder)"
        )

    classes = [name for name, _ in class_dirs]
    samples: list[tuple[str, int]] = []
    empty_classes: list[str] = []
    for label, (name, class_path) in enumerate(class_dirs):
        n_before = len(samples)
        _scan_class_dir(class_path, label, strict, samples, skipped, visited=set())
        if len(samples) == n_before:
            empty_classes.append(name)

    # Hidden clutter (.DS_Store, .ipynb_checkpoints) and root-level files get one summary warning.
    quiet_skips = sum(1 for s in skipped if s.reason in _QUIET_REASONS)
    if quiet_skips:
        warnings.warn(
            f"skipped {quiet_skips} hidden files/folders or files outside class folders under "
            f"'{root_str}' (see ImageFolderIndex.skipped)",
            DataWarning,
            stacklevel=2,
        )
    if not samples:
        raise DataError(
            f"data root '{root_str}' has {len(classes)} class folders but no valid image files "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)}); expected '{root_str}/<class>/<image>.JPEG'"
        )
    if empty_classes:
        # Kept as classes (labels stay tied to the folder listing) but almost surely a mistake.
        warnings.warn(
            f"class folders with no images under '{root_str}': {', '.join(empty_classes)}", DataWarning, stacklevel=2
        )
    samples.sort(key=lambda s: s[0])
    return ImageFolderIndex(root=root_str, classes=classes, samples=samples, skipped=skipped)


def _scan_class_dir(
    folder: str,
    label: int,
    strict: bool,
    samples: list[tuple[str, int]],
    skipped: list[SkippedFile],
    visited: set[str],
) -> None:
    # Symlinked folders are followed (like torchvision's ImageFolder); `visited` stops link cycles.
    real = os.path.realpath(folder)
    if real in visited:
        return
    visited.add(real)
    try:
        with os.scandir(folder) as it:
            # Sorted so that warnings and the strict-mode error are the same on every filesystem.
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:  # a folder this user may not list: skipped like an unreadable file
        _bad_scan_file(folder, _link_problem(e), strict, skipped)
        return
    for entry in entries:
        try:
            is_dir = entry.is_dir()
            if not is_dir and entry.is_symlink():
                entry.stat()  # a link must lead to a file: raises for a dangling link or a loop
        except OSError as e:
            _bad_scan_file(entry.path, _link_problem(e), strict, skipped)
            continue
        if entry.name.startswith("."):
            skipped.append(SkippedFile(entry.path, "hidden folder" if is_dir else "hidden file"))
            continue
        if is_dir:
            _scan_class_dir(entry.path, label, strict, samples, skipped, visited)
            continue
        if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            _bad_scan_file(entry.path, "not an image extension", strict, skipped)
            continue
        # stat() only for image-named files: one syscall each, no decoding.
        try:
            size = entry.stat().st_size
        except OSError as e:  # gone between the listing and now, or unreadable
            _bad_scan_file(entry.path, _link_problem(e), strict, skipped)
            continue
        if size == 0:
            _bad_scan_file(entry.path, "zero-byte file", strict, skipped)
            continue
        samples.append((entry.path, label))


def _link_problem(error: OSError) -> str:
    """The scan's reason for a file it cannot stat: a dangling symlink, a symlink loop, or the OS's words."""
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if error.errno == errno.ENOENT:
        return "dangling symlink (its target does not exist)"
    return f"cannot be read ({error.strerror or error})"


def _bad_scan_file(path: str, reason: str, strict: bool, skipped: list[SkippedFile]) -> None:
    if strict:
        raise DataError(f"bad file '{path}' ({reason}); set data.strict=false to skip bad files instead")
    warnings.warn(f"skipping '{path}': {reason}", DataWarning, stacklevel=2)
    skipped.append(SkippedFile(path, reason))


def sample_crop_params(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampling, drawn from ``generator``. Returns (top, left, h, w)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w

    # Fallback: whole image, narrowed along one side so its aspect ratio lies inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit greyscale is rescaled, because PIL's convert clips it at 255."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)  # (H, W)
        if arr.max(initial=0) > 255:
            arr = arr >> 8  # assume a 16-bit range
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _opened(source: str | os.PathLike | BinaryIO):
    """A path's bytes, read in one call, as a file object (PIL reads a file in many small chunks, which cost as
    much as a small decode); or a file object (a shard sample's bytes) as it is."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return contextlib.nullcontext(io.BytesIO(f.read()))
    return contextlib.nullcontext(source)


def load_rgb(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Open and fully decode an image file (a path or a file object) as RGB; raises on corrupt or truncated files."""
    with _opened(path) as f:
        img = Image.open(f)
        img.load()  # the full decode now: a truncated file raises here, inside the caller's failure handling
        return _to_rgb(img)


class PretrainDataset(torch.utils.data.Dataset):
    """Keys ``(sample index, sample seed)`` -> uint8 random-resized crop, as a dict with its label.

    An unreadable file is replaced by the next index (seeded from the original seed) and reported in
    ``"bad_files"`` once per worker process (``_known_bad`` lives in each worker's copy of the dataset)."""

    def __init__(
        self,
        index: ImageFolderIndex,
        crop_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        strict: bool = False,
        max_consecutive_failures: int = 50,
    ) -> None:
        self.index = index
        self.crop_size = crop_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.strict = strict
        self.max_consecutive_failures = max_consecutive_failures
        self._known_bad: set[str] = set()  # per process: each worker has its own copy

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, int]) -> dict:
        """key: (sample index, sample seed) -> a crop_size crop; (index, seed, B) -> a B crop decoded at reduced
        scale (`crop_at_size`: the same box, for curriculum.mode=resize, where the model sees a downsample)."""
        index, sample_seed = int(key[0]), int(key[1])
        size = int(key[2]) if len(key) == 3 else None
        n = len(self.index.samples)
        newly_bad: list[str] = []
        first_failed_path = ""
        for attempt in range(self.max_consecutive_failures):
            i = (index + attempt) % n
            seed = replacement_seed(Family.RETRY, sample_seed, attempt)
            path, label = self.index.samples[i]
            if path not in self._known_bad:
                try:
                    source = self.index.read(i)  # a path, or a shard sample's bytes
                    image = (
                        self._crop(load_rgb(source), seed) if size is None else self.crop_at_size(source, seed, size)
                    )
                except Exception as e:  # noqa: BLE001 - PIL plugins raise many types (OSError, SyntaxError, struct.error, ...)
                    if self.strict:
                        raise DataError(
                            f"cannot decode '{path}': {type(e).__name__}: {e}; "
                            "set data.strict=false to skip bad files instead"
                        ) from e
                    warnings.warn(
                        f"cannot decode '{path}' ({type(e).__name__}: {e}); using the next image instead", DataWarning
                    )
                    self._known_bad.add(path)
                    newly_bad.append(path)
                else:  # image: (3, S, S) uint8, or (3, B, B) with a size in the key
                    return {"image": image, "label": label, "bad_files": tuple(newly_bad)}
            first_failed_path = first_failed_path or path
        raise DataError(
            f"{self.max_consecutive_failures} consecutive unreadable files starting at "
            f"'{first_failed_path}'; is data.root the right folder?"
        )

    def _crop(self, img: Image.Image, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        width, height = img.size
        top, left, h, w = sample_crop_params(height, width, self.scale, self.ratio, g)
        # Crop + resize on the PIL image (fast C path, antialiased) and convert only the small result.
        img = TF.resized_crop(
            img,
            top,
            left,
            h,
            w,
            [self.crop_size, self.crop_size],
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        return self._flipped(TF.pil_to_tensor(img), g)  # (3, S, S) uint8

    def _flipped(self, image: Tensor, g: torch.Generator) -> Tensor:
        if self.hflip and torch.rand(1, generator=g).item() < 0.5:
            image = image.flip(-1)
        return image.contiguous()

    def crop_at_size(self, path: str | os.PathLike | BinaryIO, seed: int, size: int) -> Tensor:
        """`_crop`'s box and flip from the same seed, resized straight to `size` from a JPEG decoded at the
        coarsest of libjpeg's DCT scales (1/2, 1/4, 1/8) that leaves the box >= `size` (data.decode_size=stage).
        Other formats decode in full. How near the full-size path's pixels: docs/design.md, "The data stream"."""
        g = torch.Generator().manual_seed(seed)
        with _opened(path) as f:
            img = Image.open(f)
            width, height = img.size  # read from the header: nothing decoded yet
            top, left, h, w = sample_crop_params(height, width, self.scale, self.ratio, g)
            if img.format == "JPEG":
                img.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
            img.load()  # a truncated file raises here, as in load_rgb
            img = _to_rgb(img)
        sx, sy = img.width / width, img.height / height  # the decoded scale (1, 1/2, 1/4 or 1/8, rounded up)
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
        return self._flipped(TF.pil_to_tensor(img), g)  # (3, B, B) uint8


class StepSampler(torch.utils.data.Sampler):
    """One rank's keys ``(index, sample_seed)``, micro-batch after micro-batch, from ``start_micro_step`` on
    (endless unless ``num_micro_steps``); with ``size_at`` (global micro-step -> B) each key also holds its B.

    Epoch e is a permutation seeded by (seed, e), cut to whole global batches; micro-step m of it is the slice
    ``[m*B*W, (m+1)*B*W)``, of which rank r takes ``[r*B, (r+1)*B)``."""

    def __init__(
        self,
        dataset_len: int,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        start_micro_step: int = 0,
        num_micro_steps: int | None = None,
        size_at: Callable[[int], int] | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        global_batch = micro_batch * world_size
        if dataset_len // global_batch == 0:
            raise DataError(
                f"dataset of {dataset_len} images is smaller than one global batch of {global_batch}; "
                "lower train.batch_size"
            )
        self.dataset_len = dataset_len
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_micro_step = start_micro_step
        self.num_micro_steps = num_micro_steps
        self.size_at = size_at

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.dataset_len // (self.micro_batch * self.world_size)

    def epoch_permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(epoch_permutation_seed(self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=g)  # (dataset_len,) int64

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        steps_per_epoch = self.micro_steps_per_epoch
        global_batch = self.micro_batch * self.world_size
        step = self.start_micro_step
        end = None if self.num_micro_steps is None else self.start_micro_step + self.num_micro_steps
        epoch, perm = -1, []
        while end is None or step < end:
            e, m = divmod(step, steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.epoch_permutation(e).tolist()
            start = m * global_batch + self.rank * self.micro_batch
            size = () if self.size_at is None else (self.size_at(step),)
            for pos in range(start, start + self.micro_batch):
                yield perm[pos], sample_seed_for(self.seed, epoch, pos), *size
            step += 1

    def __len__(self) -> int:
        if self.num_micro_steps is None:
            raise TypeError("StepSampler is endless (num_micro_steps=None) and has no length")
        return self.num_micro_steps * self.micro_batch


@dataclass
class PretrainBatch:
    images: Tensor  # (N, 3, S, S) uint8
    labels: Tensor  # (N,) int64
    bad_files: tuple[str, ...]  # files first found unreadable while building this batch (per worker)

    def pin_memory(self) -> PretrainBatch:
        # Called by the DataLoader's pin-memory thread; it does not know this dataclass otherwise.
        return PretrainBatch(self.images.pin_memory(), self.labels.pin_memory(), self.bad_files)


def collate_pretrain(items: list[dict]) -> PretrainBatch:
    images = torch.stack([item["image"] for item in items])  # (N, 3, S, S) uint8
    labels = torch.tensor([item["label"] for item in items], dtype=torch.int64)  # (N,)
    bad_files = tuple(path for item in items for path in item["bad_files"])
    return PretrainBatch(images=images, labels=labels, bad_files=bad_files)


def step_loader(
    dataset: torch.utils.data.Dataset,
    sampler: StepSampler,
    num_workers: int,
    pin_memory: bool = False,
    collate_fn: Callable | None = collate_pretrain,
    persistent_workers: bool = True,
) -> torch.utils.data.DataLoader:
    """The DataLoader of `sampler`'s micro-batches over `dataset`, read in `num_workers` workers: the one loader of
    every source whose workers read or decode (`collate_fn=None`: torch's default collate)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=sampler.micro_batch,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=True,
    )


@functools.lru_cache(maxsize=32)
def _channel_affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # (x/255 - mean)/std == x * scale + shift. Built once per device: creating a tensor from Python
    # numbers on an accelerator is a blocking host->device copy, so it must not happen every step.
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
    return scale.view(1, -1, 1, 1).to(device), shift.view(1, -1, 1, 1).to(device)  # (1, C, 1, 1) each


def normalize_on_device(
    images_uint8: Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """uint8 (N, C, S, S) -> ``dtype`` (N, C, S, S), ``(x/255 - mean)/std``, on the images' device."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"expected uint8 (N, C, S, S) images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    if images_uint8.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"{images_uint8.shape[1]} channels but mean/std have {len(mean)}/{len(std)} entries")
    scale, shift = _channel_affine(tuple(map(float, mean)), tuple(map(float, std)), images_uint8.device)
    # Affine in float32 even for bf16 outputs: bf16 would round the scale itself by up to 0.4%.
    out = images_uint8.to(torch.float32) * scale + shift  # (N, C, S, S) float32
    return out.to(dtype)
