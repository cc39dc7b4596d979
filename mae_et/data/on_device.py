"""Fast data paths for MAE pretraining: random-resized crops computed in one batched op on the device.

The portable loader (``mae_et.data.folder``) decodes and crops with PIL in DataLoader workers, which tops out
far below the ~20,000 img/s an H100 consumes at the small curriculum sizes. Two faster sources
yield the same ``PretrainBatch`` (uint8 crops), already on the device:

* ``MemoryBatchSource`` over an ``InMemoryImages`` store: every image decoded ONCE, kept as a uint8
  (N, 3, s, s) tensor (on the GPU when it fits); a step is a gather + one ``grid_sample``.
* ``DeviceDecodeBatchSource`` for data sets that do not fit: workers only read file bytes, the main
  process decodes the batch with ``mae_et.data.jpeg.decode_jpegs(list, device)`` (TorchCodec where installed,
  torchvision otherwise; batched nvjpeg on CUDA), then crops on the device the same way.

Both follow the SAME global sample order as the loader path (``StepSampler``: epoch permutation,
micro-step slice, rank shard). Their per-sample randomness (crop box, flip) comes from one generator
per micro-step, seeded by (seed, global micro-step, rank), instead of per-sample seeds: pixels differ
from the loader path but the crop statistics are the same, and a run resumed at micro-step s sees
exactly the batches of an uninterrupted run from s on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from mae_et.data.folder import (
    DataError,
    ImageFolderIndex,
    PretrainBatch,
    SkippedFile,
    StepSampler,
    load_rgb,
)
from mae_et.data.jpeg import decode_jpegs
from mae_et.notices import DataWarning
from mae_et.notices import progress as show_progress
from mae_et.seeding import Family, mix64

_TRIES = 10  # RandomResizedCrop's number of box proposals per sample
_MAX_GRID_DOWNSCALE = 2.0  # boxes shrinking more than this get an antialiased resize first (decode path)
_MAX_CONSECUTIVE_FAILURES = 50  # as PretrainDataset: this many unreadable files in a row = wrong folder


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the crop/flip generator of one (global micro-step, rank): a pure function of position."""
    return mix64(Family.STEP_AUGMENT, seed, micro_step, rank)


# ----------------------------------------------------------------------------------------------
# Batched RandomResizedCrop
# ----------------------------------------------------------------------------------------------


def random_resized_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """Vectorised RandomResizedCrop box sampling: (N,) source sizes -> (N, 4) int64 [top, left, h, w].

    Same algorithm as torchvision (and ``mae_et.data.folder.sample_crop_params``): 10 proposals of area
    ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first that fits wins; top/left uniform over
    the valid positions; no fit -> the centred box with the aspect ratio clamped to ``ratio``. All 10
    proposals of every sample are drawn at once (the loop stops at the first fit, which only wastes
    draws), so there is no host sync and no Python loop over the batch.
    """
    device = heights.device
    n = heights.shape[0]
    # float64 box arithmetic, as torchvision's Python floats: in float32, e.g. 375 * 0.3 rounds to
    # 113 instead of 112. The arrays are (N, 10): the cost is nil on any device.
    h_src = heights.to(torch.float64)  # (N,)
    w_src = widths.to(torch.float64)  # (N,)
    # One draw for everything: 10 areas, 10 aspects, top, left per sample.
    u = torch.rand((n, 2 * _TRIES + 2), generator=generator, device=device).to(torch.float64)  # (N, 22)
    u_area, u_ratio, u_top, u_left = u[:, :_TRIES], u[:, _TRIES : 2 * _TRIES], u[:, -2], u[:, -1]

    area = (h_src * w_src)[:, None]  # (N, 1)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)  # (N, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)  # (N, 10)
    # torch.round is round-half-to-even, like Python's round() in torchvision.
    w_try = torch.round(torch.sqrt(target_area * aspect)).to(torch.int64)  # (N, 10)
    h_try = torch.round(torch.sqrt(target_area / aspect)).to(torch.int64)  # (N, 10)
    fits = (w_try > 0) & (w_try <= widths[:, None]) & (h_try > 0) & (h_try <= heights[:, None])  # (N, 10)

    # Index of the first fitting proposal; _TRIES when none fits.
    tries = torch.arange(_TRIES, device=device)  # (10,)
    first = torch.where(fits, tries, _TRIES).amin(dim=1)  # (N,)
    found = first < _TRIES  # (N,) bool
    pick = first.clamp(max=_TRIES - 1)[:, None]  # (N, 1)
    h_fit = h_try.gather(1, pick).squeeze(1)  # (N,)
    w_fit = w_try.gather(1, pick).squeeze(1)  # (N,)
    # U{0..H-h}: floor(u * (H-h+1)), u in [0, 1); the clamp is a guard against rounding up to H-h+1.
    top_fit = torch.minimum((u_top * (heights - h_fit + 1)).floor().to(torch.int64), heights - h_fit)  # (N,)
    left_fit = torch.minimum((u_left * (widths - w_fit + 1)).floor().to(torch.int64), widths - w_fit)  # (N,)

    # Fallback: whole image, narrowed along one side so its aspect ratio lies inside `ratio`.
    r_lo, r_hi = min(ratio), max(ratio)
    in_ratio = w_src / h_src  # (N,)
    too_tall = in_ratio < r_lo
    too_wide = in_ratio > r_hi
    h_fb = torch.where(too_tall, torch.round(w_src / r_lo).to(torch.int64), heights)  # (N,)
    w_fb = torch.where(too_wide, torch.round(h_src * r_hi).to(torch.int64), widths)  # (N,)
    top_fb = torch.div(heights - h_fb, 2, rounding_mode="floor")  # (N,)
    left_fb = torch.div(widths - w_fb, 2, rounding_mode="floor")  # (N,)

    top = torch.where(found, top_fit, top_fb)  # (N,)
    left = torch.where(found, left_fit, left_fb)  # (N,)
    h = torch.where(found, h_fit, h_fb)  # (N,)
    w = torch.where(found, w_fit, w_fb)  # (N,)
    return torch.stack([top, left, h, w], dim=1)  # (N, 4) int64


def random_crops_and_flips(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Boxes (N, 4) int64 and flips (N,) bool for one micro-batch, all from ``generator``."""
    boxes = random_resized_crop_boxes(heights, widths, scale, ratio, generator)  # (N, 4)
    # Drawn even when hflip is off, so that switching flips off leaves the boxes unchanged.
    u_flip = torch.rand(heights.shape[0], generator=generator, device=heights.device)  # (N,) in [0, 1)
    flip = u_flip < (0.5 if hflip else 0.0)  # (N,) bool; u < 0 never holds
    return boxes, flip


# ----------------------------------------------------------------------------------------------
# Batched crop + resize + flip
# ----------------------------------------------------------------------------------------------


def crop_resize_flip(
    images: Tensor,
    sizes: Tensor | None,
    boxes: Tensor,
    flip: Tensor,
    out_size: int,
) -> Tensor:
    """uint8 (N, 3, Hc, Wc) canvas + boxes (N, 4) [top, left, h, w] + flips (N,) -> uint8 (N, 3, S, S).

    One batched ``affine_grid`` + ``grid_sample`` (bilinear, align_corners=False) in float32: each
    output pixel centre maps to the matching point of its box, as in crop-then-resize; the flip is a
    negative x scale. Sampling points are clamped to the centres of the box's edge pixels (and of the
    true image, ``sizes`` (N, 2) = (H, W) of each sample on a padded canvas; None = the whole canvas),
    which is exactly the edge replication a resize of the cropped image does: bilinear taps beyond
    the box get weight 0, so padding never leaks in.

    grid_sample does NOT antialias: shrinking a box by a factor f > 1 reads only 2x2 taps per output
    pixel and aliases more as f grows. Keep f small: store images at ~ crop_size * 256/224 (memory
    path: f <= 1.14), or shrink large boxes first (the device-decode path does, above 2x).
    """
    n, c, canvas_h, canvas_w = images.shape
    device = images.device
    box = boxes.to(device=device, dtype=torch.float32)  # (N, 4)
    top, left, h, w = box.unbind(dim=1)  # (N,) each

    # Normalised coords (align_corners=False): x_in = 2 X / Wc - 1 with X in pixel units, and output
    # x_out = 2 (i + 0.5) / S - 1, so X = left + w (x_out + 1) / 2  =>  x_in = (w/Wc) x_out + (2 left + w)/Wc - 1.
    scale_x = w / canvas_w  # (N,)
    scale_x = torch.where(flip.to(device), -scale_x, scale_x)  # mirror about the box centre
    shift_x = (2 * left + w) / canvas_w - 1  # (N,)
    scale_y = h / canvas_h  # (N,)
    shift_y = (2 * top + h) / canvas_h - 1  # (N,)
    zeros = torch.zeros_like(scale_x)  # (N,)
    theta = torch.stack(
        [torch.stack([scale_x, zeros, shift_x], dim=1), torch.stack([zeros, scale_y, shift_y], dim=1)], dim=1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [n, c, out_size, out_size], align_corners=False)  # (N, S, S, 2) as (x, y)

    # Clamp to the centres of the first/last pixel of the box, itself clipped to the true image.
    right = left + w  # (N,)
    bottom = top + h  # (N,)
    if sizes is not None:
        true_hw = sizes.to(device=device, dtype=torch.float32)  # (N, 2)
        bottom = torch.minimum(bottom, true_hw[:, 0])
        right = torch.minimum(right, true_hw[:, 1])
    lo = torch.stack([(2 * left + 1) / canvas_w - 1, (2 * top + 1) / canvas_h - 1], dim=1)  # (N, 2)
    hi = torch.stack([(2 * right - 1) / canvas_w - 1, (2 * bottom - 1) / canvas_h - 1], dim=1)  # (N, 2)
    grid = torch.maximum(torch.minimum(grid, hi[:, None, None, :]), lo[:, None, None, :])  # (N, S, S, 2)

    out = F.grid_sample(
        images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False
    )  # (N, 3, S, S) float32
    return out.round_().clamp_(0, 255).to(torch.uint8)  # (N, 3, S, S) uint8


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device without stalling the CPU on queued GPU work (pinned, non-blocking)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _pil_to_uint8(img) -> Tensor:
    return TF.pil_to_tensor(img)  # (3, H, W) uint8


def _resize_short_center_crop(img, size: int) -> Tensor:
    """PIL RGB -> shorter side to ``size`` (bicubic, antialias) -> centre ``size`` x ``size`` -> uint8 (3, s, s)."""
    if min(img.size) != size:
        img = TF.resize(img, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [size, size])
    return _pil_to_uint8(img)  # (3, s, s) uint8


# ----------------------------------------------------------------------------------------------
# In-memory store
# ----------------------------------------------------------------------------------------------


class _DecodeResizeDataset(torch.utils.data.Dataset):
    """Index i -> (i, uint8 (3, s, s) or None, error message). Runs in DataLoader workers."""

    def __init__(self, paths: list[str], store_size: int) -> None:
        self.paths = paths
        self.store_size = store_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str]:
        try:
            img = load_rgb(self.paths[i])
        except Exception as e:  # noqa: BLE001 - PIL plugins raise many types
            return i, None, f"cannot decode: {type(e).__name__}: {e}"
        return i, _resize_short_center_crop(img, self.store_size), ""


def _collate_list(items: list) -> list:
    return items


class InMemoryImages:
    """Every image of ``index`` decoded once, resized, centre-cropped and kept as uint8 on ``device``.

    Decoding runs once, in parallel (a DataLoader with ``num_workers`` over the files, ``load_rgb``):
    shorter side -> ``store_size`` (bicubic, antialias), centre ``store_size`` x ``store_size``. Pick
    store_size ~ crop_size * 256/224 so that the later bilinear (non-antialiased) crop-resize shrinks
    by at most ~1.14. Put it on the GPU when it fits (ImageNet-1k at 256 px is ~250 GB: it does not),
    else on the CPU with ``pin_memory=True`` for fast non-blocking uploads.

    Unreadable files are skipped with a warning naming each and listed in ``skipped``; positions in
    the store are then those of the readable files (so the sample order equals the loader path's only
    when nothing was skipped). ``strict=True`` raises ``DataError`` naming the first unreadable file.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
        store_size: int,
        device: torch.device | str,
        strict: bool = False,
        num_workers: int = 4,
        pin_memory: bool = False,
        progress: bool = False,
    ) -> None:
        if store_size <= 0:
            raise ValueError(f"store_size must be positive, got {store_size}")
        if not index.samples:
            raise DataError(f"data root '{index.root}' has no images; check data.root")
        self.device = torch.device(device)
        self.store_size = store_size
        self.root = index.root
        paths = [p for p, _ in index.samples]
        n = len(paths)
        s = store_size
        pin = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()  # pinning needs CUDA
        # Filled in index order; rows of skipped files are simply not written, the tail is cut at the end.
        images = torch.empty((n, 3, s, s), dtype=torch.uint8, device=self.device, pin_memory=pin)  # (n, 3, s, s)
        kept: list[int] = []  # index positions of readable files, in order
        self.skipped: list[SkippedFile] = []

        loader = torch.utils.data.DataLoader(
            _DecodeResizeDataset(paths, s),
            batch_size=32,
            num_workers=num_workers,
            collate_fn=_collate_list,
            shuffle=False,  # in order: the store keeps the index's order
        )
        bar = show_progress(total=n, desc=f"decode once ({s} px)", unit="img", enabled=progress)
        for chunk in loader:
            bar.update(len(chunk))
            good: list[Tensor] = []
            for i, image, error in chunk:
                if image is None:
                    if strict:
                        raise DataError(
                            f"bad file '{paths[i]}' ({error}); set data.strict=false to skip bad files instead"
                        )
                    warnings.warn(f"skipping '{paths[i]}': {error}", DataWarning, stacklevel=2)
                    self.skipped.append(SkippedFile(paths[i], error))
                else:
                    good.append(image)
                    kept.append(i)
            if good:
                start = len(kept) - len(good)
                images[start : len(kept)].copy_(torch.stack(good))  # (k, 3, s, s) uint8
        bar.close()
        if not kept:
            raise DataError(f"none of the {n} images under '{index.root}' could be decoded; check data.root")

        self.images: Tensor = images[: len(kept)]  # (N, 3, s, s) uint8; a view: no second copy
        labels = torch.tensor([index.samples[i][1] for i in kept], dtype=torch.int64)  # (N,)
        self.labels: Tensor = labels.to(self.device)  # (N,) int64
        self.paths: list[str] = [paths[i] for i in kept]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()


# ----------------------------------------------------------------------------------------------
# Memory batch source
# ----------------------------------------------------------------------------------------------


class MemoryBatchSource:
    """Endless (or ``num_micro_steps``-long) stream of ``PretrainBatch`` from an ``InMemoryImages``.

    Micro-step g: indices = the loader path's ``StepSampler`` slice for (g, rank) (taken straight
    from the epoch permutation, kept on the store's device, so a step moves nothing host -> device),
    gather, boxes and flips from a generator seeded by ``step_seed(seed, g, rank)``, one
    ``crop_resize_flip`` to ``crop_size``. The object is its own iterator: ``iter()`` does not rewind.

    ``device`` (default: the store's) is where the crops are computed and returned; with a pinned
    CPU store and a CUDA device, the gathered uint8 source images are uploaded non-blocking.
    """

    def __init__(
        self,
        store: InMemoryImages,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        crop_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        start_micro_step: int = 0,
        num_micro_steps: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        # The StepSampler validates the arguments and owns the epoch permutations.
        self.sampler = StepSampler(len(store), micro_batch, rank, world_size, seed, start_micro_step, num_micro_steps)
        self.store = store
        self.device = torch.device(device) if device is not None else store.device
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.crop_size = crop_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.step = start_micro_step  # next global micro-step
        self.end = None if num_micro_steps is None else start_micro_step + num_micro_steps
        self._epoch = -1
        self._perm: Tensor | None = None  # (len(store),) int64 on the store's device
        s = store.store_size
        self._heights = torch.full((micro_batch,), s, dtype=torch.int64, device=self.device)  # (B,)
        self._generator = torch.Generator(device=self.device)

    def micro_step_indices(self, micro_step: int) -> Tensor:
        """Store indices of global micro-step ``micro_step`` for this rank: (B,) int64 on the store's device."""
        e, m = divmod(micro_step, self.sampler.micro_steps_per_epoch)
        if e != self._epoch:
            # Once per epoch: the same permutation StepSampler uses, uploaded once.
            self._perm = self.sampler.epoch_permutation(e).to(self.store.device)  # (len(store),)
            self._epoch = e
        start = m * self.micro_batch * self.world_size + self.rank * self.micro_batch
        return self._perm[start : start + self.micro_batch]  # (B,) int64

    def __iter__(self) -> MemoryBatchSource:
        return self

    def __next__(self) -> PretrainBatch:
        if self.end is not None and self.step >= self.end:
            raise StopIteration
        idx = self.micro_step_indices(self.step)  # (B,) on the store's device
        images = self._gather(idx)  # (B, 3, s, s) uint8 on self.device
        labels = self.store.labels.index_select(0, idx)  # (B,) int64 on the store's device
        if labels.device != self.device:
            labels = _to_device(labels, self.device)
        self._generator.manual_seed(step_seed(self.seed, self.step, self.rank))
        boxes, flip = random_crops_and_flips(
            self._heights, self._heights, self.scale, self.ratio, self.hflip, self._generator
        )  # (B, 4), (B,)
        crops = crop_resize_flip(images, None, boxes, flip, self.crop_size)  # (B, 3, crop, crop) uint8
        self.step += 1
        return PretrainBatch(images=crops, labels=labels, bad_files=())

    def _gather(self, idx: Tensor) -> Tensor:
        src = self.store.images  # (N, 3, s, s) uint8
        if src.device == self.device:
            return src.index_select(0, idx)  # (B, 3, s, s)
        if self.device.type == "cuda" and src.is_pinned():
            # Gather straight into pinned memory, then an async upload. The caching host allocator
            # does not hand this buffer out again until the copy has finished.
            buf = torch.empty((idx.shape[0], *src.shape[1:]), dtype=src.dtype, pin_memory=True)  # (B, 3, s, s)
            torch.index_select(src, 0, idx, out=buf)
            return buf.to(self.device, non_blocking=True)
        return src.index_select(0, idx).to(self.device)


# ----------------------------------------------------------------------------------------------
# Device-decode batch source
# ----------------------------------------------------------------------------------------------


_SOF_DEVICE_OK = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive Huffman frames
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless / hierarchical / arithmetic


def jpeg_device_decodable(data: bytes) -> bool:
    """Whether ``data`` looks like a JPEG the batched device decoder handles: 8-bit, 1 or 3 components.

    Reads only the marker headers up to the frame header. CMYK/YCCK (4 components), 12-bit, lossless
    and arithmetic-coded files and non-JPEGs (PNG, ...) go straight to the CPU decoder instead of
    failing the whole batched call.
    """
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    pos = 2
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in _SOF_DEVICE_OK:
            if pos + 10 > size:
                return False
            precision, components = data[pos + 4], data[pos + 9]
            return precision == 8 and components in (1, 3)
        if marker in _SOF_OTHER or marker in (0xDA, 0xD9):  # other frame types, or a scan before any frame
            return False
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return False


@dataclass
class _RawBatch:
    """File bytes of one micro-batch, packed in one tensor (one shared-memory transfer per batch)."""

    indices: list[int]
    labels: list[int]
    data: Tensor  # (total_bytes,) uint8, files back to back
    lengths: list[int]
    device_ok: list[bool]
    read_errors: list[str]  # "" when the file was read


class _FileBytesDataset(torch.utils.data.Dataset):
    """Key (index, sample_seed) -> raw file bytes. Workers only read; decoding happens on the device."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int, bytes, str]:
        index = int(key[0])
        path, label = self.samples[index]
        try:
            with open(path, "rb") as f:
                return index, label, f.read(), ""
        except OSError as e:
            return index, label, b"", f"cannot read: {type(e).__name__}: {e}"


def _collate_bytes(items: list[tuple[int, int, bytes, str]]) -> _RawBatch:
    lengths = [len(b) for _, _, b, _ in items]
    data = torch.empty(sum(lengths), dtype=torch.uint8)  # (total,)
    view = data.numpy()
    pos = 0
    for (_, _, b, _), n in zip(items, lengths):
        view[pos : pos + n] = np.frombuffer(b, dtype=np.uint8)
        pos += n
    return _RawBatch(
        indices=[i for i, _, _, _ in items],
        labels=[lab for _, lab, _, _ in items],
        data=data,
        lengths=lengths,
        device_ok=[jpeg_device_decodable(b) for _, _, b, _ in items],
        read_errors=[err for _, _, _, err in items],
    )


def _decode_on_device(datas: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Batched decode (nvjpeg on CUDA; TorchCodec or torchvision, `mae_et.data.jpeg`); one bad file costs one image."""
    return decode_jpegs(datas, device)


def _as_rgb(image: Tensor) -> Tensor:
    """(C, H, W) uint8 -> (3, H, W): grey is repeated (decoders asked for RGB normally return 3 already)."""
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    return image[:3]


def _shrink_if_large(crop: Tensor, out_size: int) -> Tensor:
    """Boxes shrinking by more than _MAX_GRID_DOWNSCALE are resized to (S, S) with antialias here.

    grid_sample would alias there (2x2 taps per output pixel); a per-sample antialiased resize is
    costlier but only hits big boxes of big images. It is the same RRC output size, so the later
    grid_sample of this slot is an identity (plus flip).
    """
    _, h, w = crop.shape
    if max(h, w) <= _MAX_GRID_DOWNSCALE * out_size:
        return crop
    small = F.interpolate(
        crop[None].to(torch.float32), size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True
    )  # (1, 3, S, S) float32
    return small[0].round_().clamp_(0, 255).to(torch.uint8)  # (3, S, S)


def crops_on_canvas(images: Sequence[Tensor], boxes: list[list[int]], out_size: int) -> tuple[Tensor, Tensor]:
    """Cut each box out of its image (shrinking big ones) onto one zero-padded uint8 canvas.

    images: N tensors (3, H_i, W_i) uint8 on one device; boxes: N host [top, left, h, w].
    Returns canvas (N, 3, Hmax, Wmax) uint8 and sizes (N, 2) int64 (host) of each crop on it, with
    every crop at the top-left. Cutting first bounds the canvas by the largest box (<= 2 S per side
    after shrinking), not by the largest image of the batch.
    """
    crops = []
    for image, (top, left, h, w) in zip(images, boxes):
        crops.append(_shrink_if_large(image[:, top : top + h, left : left + w], out_size))  # (3, h', w')
    sizes = torch.tensor([[c.shape[1], c.shape[2]] for c in crops], dtype=torch.int64)  # (N, 2) host
    max_h, max_w = max(c.shape[1] for c in crops), max(c.shape[2] for c in crops)
    canvas = torch.zeros((len(crops), 3, max_h, max_w), dtype=torch.uint8, device=images[0].device)  # (N, 3, Hm, Wm)
    for i, c in enumerate(crops):
        canvas[i, :, : c.shape[1], : c.shape[2]] = c
    return canvas, sizes


class DeviceDecodeBatchSource:
    """``PretrainBatch`` stream for data sets too big for memory: read bytes in workers, decode on the device.

    Per micro-step: DataLoader workers read the files of the ``StepSampler`` keys (no decoding); the
    main process decodes the batch with ``decode_jpegs(list, device)`` (batched nvjpeg on CUDA,
    libjpeg-turbo on CPU). Files the device decoder cannot take (CMYK, 12-bit, PNG, ... found from
    the header, or a decode error) are decoded on the CPU with ``load_rgb``. A file neither decodes
    is warned about once, reported once in ``bad_files`` and replaced by the next readable index (as
    ``PretrainDataset``), so the batch size stays constant; ``strict=True`` raises instead.

    Boxes and flips come from a CPU generator seeded by ``step_seed(seed, g, rank)`` (the image
    sizes are host metadata, so the boxes are known on the host without a device sync and the crops
    can be cut before padding), then one ``crop_resize_flip`` on the device. Same keys => same crops.
    The object is its own iterator: ``iter()`` does not rewind.
    """

    def __init__(
        self,
        index: ImageFolderIndex,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        crop_size: int,
        device: torch.device | str,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        strict: bool = False,
        start_micro_step: int = 0,
        num_micro_steps: int | None = None,
        num_workers: int = 4,
    ) -> None:
        if not index.samples:
            raise DataError(f"data root '{index.root}' has no images; check data.root")
        if crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.index = index
        self.device = torch.device(device)
        self.micro_batch = micro_batch
        self.rank = rank
        self.seed = seed
        self.crop_size = crop_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.strict = strict
        self.step = start_micro_step  # next global micro-step
        self._known_bad: set[str] = set()  # one process decodes, so each bad file is reported once
        sampler = StepSampler(
            len(index.samples), micro_batch, rank, world_size, seed, start_micro_step, num_micro_steps
        )
        self.loader = torch.utils.data.DataLoader(
            _FileBytesDataset(index.samples),
            batch_size=micro_batch,
            sampler=sampler,
            collate_fn=_collate_bytes,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
            drop_last=True,
        )
        self._batches: Iterator[_RawBatch] | None = None
        self._generator = torch.Generator()  # CPU: boxes are needed on the host to cut the crops

    def __iter__(self) -> DeviceDecodeBatchSource:
        return self

    def __next__(self) -> PretrainBatch:
        if self._batches is None:
            self._batches = iter(self.loader)
        raw = next(self._batches)  # StopIteration ends the stream
        images, labels, bad = self._decode_batch(raw)  # B tensors (3, H_i, W_i) uint8 on the device

        heights = torch.tensor([im.shape[1] for im in images], dtype=torch.int64)  # (B,) host
        widths = torch.tensor([im.shape[2] for im in images], dtype=torch.int64)  # (B,) host
        self._generator.manual_seed(step_seed(self.seed, self.step, self.rank))
        boxes, flip = random_crops_and_flips(heights, widths, self.scale, self.ratio, self.hflip, self._generator)
        canvas, sizes = crops_on_canvas(images, boxes.tolist(), self.crop_size)  # (B, 3, Hm, Wm), (B, 2)
        local_boxes = torch.cat([torch.zeros_like(sizes), sizes], dim=1)  # (B, 4): each crop at the top-left
        crops = crop_resize_flip(
            canvas,
            _to_device(sizes, self.device),
            _to_device(local_boxes, self.device),
            _to_device(flip, self.device),
            self.crop_size,
        )  # (B, 3, crop, crop) uint8
        self.step += 1
        label_t = _to_device(torch.tensor(labels, dtype=torch.int64), self.device)  # (B,)
        return PretrainBatch(images=crops, labels=label_t, bad_files=tuple(bad))

    # -- decoding ------------------------------------------------------------------------------

    def _decode_batch(self, raw: _RawBatch) -> tuple[list[Tensor], list[int], list[str]]:
        datas = list(torch.split(raw.data, raw.lengths))  # B views (n_i,) uint8
        paths = [self.index.samples[i][0] for i in raw.indices]
        on_device = [
            i
            for i in range(len(datas))
            if raw.device_ok[i] and not raw.read_errors[i] and paths[i] not in self._known_bad
        ]
        decoded: list[Tensor | None] = [None] * len(datas)
        for i, image in zip(on_device, _decode_on_device([datas[i] for i in on_device], self.device)):
            decoded[i] = None if image is None else _as_rgb(image)

        labels = list(raw.labels)
        bad: list[str] = []
        for i in range(len(datas)):
            if decoded[i] is not None:
                continue
            # Not taken (or rejected) by the device decoder: CPU decoder, then replacement.
            image, error = self._decode_cpu(paths[i], raw.read_errors[i])
            if image is None:
                image, labels[i] = self._replace(raw.indices[i], paths[i], error, bad)
            decoded[i] = image
        return decoded, labels, bad  # type: ignore[return-value]

    def _decode_cpu(self, path: str, read_error: str) -> tuple[Tensor | None, str]:
        if path in self._known_bad:
            return None, "known bad"
        if read_error:
            return None, read_error
        try:
            img = load_rgb(path)
        except Exception as e:  # noqa: BLE001 - PIL plugins raise many types
            return None, f"{type(e).__name__}: {e}"
        return _pil_to_uint8(img).to(self.device), ""  # (3, H, W)

    def _decode_one(self, path: str) -> tuple[Tensor | None, str]:
        """Read + decode one file in the main process (replacements only: rare)."""
        if path in self._known_bad:
            return None, "known bad"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"cannot read: {type(e).__name__}: {e}"
        if jpeg_device_decodable(data):
            image = _decode_on_device([torch.frombuffer(bytearray(data), dtype=torch.uint8)], self.device)[0]
            if image is not None:
                return _as_rgb(image), ""
        return self._decode_cpu(path, "")

    def _replace(self, index: int, path: str, error: str, bad: list[str]) -> tuple[Tensor, int]:
        """PretrainDataset's rule: the next indices in turn until one decodes."""
        self._report_bad(path, error, bad)
        n = len(self.index.samples)
        for attempt in range(1, _MAX_CONSECUTIVE_FAILURES):
            j = (index + attempt) % n
            path_j, label_j = self.index.samples[j]
            image, error_j = self._decode_one(path_j)
            if image is not None:
                return image, label_j
            if path_j not in self._known_bad:
                self._report_bad(path_j, error_j, bad)
        raise DataError(
            f"{_MAX_CONSECUTIVE_FAILURES} consecutive unreadable files starting at '{path}'; is data.root the right "
            "folder?"
        )

    def _report_bad(self, path: str, error: str, bad: list[str]) -> None:
        if path in self._known_bad:
            return
        if self.strict:
            raise DataError(f"cannot decode '{path}' ({error}); set data.strict=false to skip bad files instead")
        warnings.warn(f"cannot decode '{path}' ({error}); using the next image instead", DataWarning, stacklevel=3)
        self._known_bad.add(path)
        bad.append(path)
