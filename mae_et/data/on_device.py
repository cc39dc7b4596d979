"""Random-resized crops of a whole micro-batch in one batched op on the device, and the memory pipeline.

``MemoryBatchSource`` crops from ``InMemoryImages``, every image decoded once and kept as uint8 (on the GPU when it
fits); ``mae_et.data.device_decode`` crops the same way. Both take the loader path's keys (``StepSampler``: same
images, same order, same resume); their boxes and flips come from one generator per (seed, micro-step, rank)
instead of per-sample seeds, so pixels differ from the loader's while the crop statistics match. Design notes:
docs/design.md, "The device data paths".
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from mae_et.data.folder import DataError, ImageFolderIndex, PretrainBatch, SkippedFile, StepSampler, load_rgb
from mae_et.notices import DataWarning
from mae_et.notices import progress as show_progress
from mae_et.seeding import Family, mix64

_TRIES = 10  # RandomResizedCrop's number of box proposals per sample


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """Seed of the crop/flip generator of one (global micro-step, rank): a pure function of position."""
    return mix64(Family.STEP_AUGMENT, seed, micro_step, rank)


def random_resized_crop_boxes(
    heights: Tensor,
    widths: Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """torchvision's RandomResizedCrop box sampling, vectorised: (N,) source sizes -> (N, 4) int64 [top, left, h, w].

    All 10 proposals of every sample are drawn at once (the first that fits wins), so there is no host sync and no
    Python loop over the batch."""
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


def crop_resize_flip(
    images: Tensor,
    sizes: Tensor | None,
    boxes: Tensor,
    flip: Tensor,
    out_size: int,
) -> Tensor:
    """uint8 (N, 3, Hc, Wc) canvas + boxes (N, 4) [top, left, h, w] + flips (N,) -> uint8 (N, 3, S, S).

    One batched ``affine_grid`` + bilinear ``grid_sample``, its taps clamped to the box (and to each sample's true
    size on a padded canvas, ``sizes`` (N, 2); None: the whole canvas), as crop-then-resize would. It does not
    antialias, so boxes must not shrink much (docs/design.md, "The device data paths")."""
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


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device without stalling the CPU on queued GPU work (pinned, non-blocking)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class StepCrops:
    """What both device sources share: the stream of keys (a ``StepSampler``), the crop, and the boxes and flips of
    each micro-step, drawn from ``generator`` seeded by ``step_seed(seed, micro-step, rank)``."""

    def __init__(self, sampler: StepSampler, crop_size, scale, ratio, hflip, generator: torch.Generator) -> None:
        self.sampler = sampler
        self.crop_size = crop_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.step = sampler.start_micro_step  # next global micro-step
        self._generator = generator

    def _boxes_and_flips(self, heights: Tensor, widths: Tensor) -> tuple[Tensor, Tensor]:
        self._generator.manual_seed(step_seed(self.sampler.seed, self.step, self.sampler.rank))
        return random_crops_and_flips(heights, widths, self.scale, self.ratio, self.hflip, self._generator)

    def __iter__(self):  # its own iterator: iter() does not rewind
        return self


class _DecodeResizeDataset(torch.utils.data.Dataset):
    """Index i -> (i, uint8 (3, s, s) or None, error message): short side to s (bicubic, antialiased), centre crop."""

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
        s = self.store_size
        if min(img.size) != s:
            img = TF.resize(img, [s], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return i, TF.pil_to_tensor(TF.center_crop(img, [s, s])), ""


class InMemoryImages:
    """Every image of ``index`` decoded once in ``num_workers`` workers (short side -> ``store_size``, bicubic,
    antialiased; centre crop) and kept as uint8 (N, 3, s, s) on ``device`` (pinned on the CPU with ``pin_memory``).

    Unreadable files are skipped, named in a warning and listed in ``skipped`` (``strict=True``: a ``DataError``);
    the store then holds the readable ones in order."""

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
        self.device = torch.device(device)
        self.store_size = store_size
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
            collate_fn=list,
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


class MemoryBatchSource(StepCrops):
    """``PretrainBatch`` stream from an ``InMemoryImages`` store: per micro-step, the sampler's indices (taken from
    its epoch permutation, kept on the store's device), a gather and one ``crop_resize_flip``, on ``device``
    (default: the store's; a pinned CPU store is uploaded non-blocking)."""

    def __init__(
        self,
        store: InMemoryImages,
        sampler: StepSampler,
        crop_size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.store = store
        self.device = torch.device(device) if device is not None else store.device
        super().__init__(sampler, crop_size, scale, ratio, hflip, torch.Generator(device=self.device))
        self.end = None if sampler.num_micro_steps is None else sampler.start_micro_step + sampler.num_micro_steps
        self._epoch = -1
        self._perm: Tensor | None = None  # (len(store),) int64 on the store's device
        self._heights = torch.full((sampler.micro_batch,), store.store_size, dtype=torch.int64, device=self.device)

    def micro_step_indices(self, micro_step: int) -> Tensor:
        """Store indices of global micro-step ``micro_step`` for this rank: (B,) int64 on the store's device."""
        sampler = self.sampler
        e, m = divmod(micro_step, sampler.micro_steps_per_epoch)
        if e != self._epoch:  # once per epoch: the sampler's permutation, uploaded once
            self._perm = sampler.epoch_permutation(e).to(self.store.device)  # (len(store),)
            self._epoch = e
        start = m * sampler.micro_batch * sampler.world_size + sampler.rank * sampler.micro_batch
        return self._perm[start : start + sampler.micro_batch]  # (B,) int64

    def __next__(self) -> PretrainBatch:
        if self.end is not None and self.step >= self.end:
            raise StopIteration
        idx = self.micro_step_indices(self.step)  # (B,) on the store's device
        images = self._gather(idx)  # (B, 3, s, s) uint8 on self.device
        labels = self.store.labels.index_select(0, idx)  # (B,) int64 on the store's device
        if labels.device != self.device:
            labels = to_device(labels, self.device)
        boxes, flip = self._boxes_and_flips(self._heights, self._heights)  # (B, 4), (B,)
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
