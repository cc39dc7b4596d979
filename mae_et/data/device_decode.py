"""data.pipeline=device_decode: workers read file bytes, the device decodes them (``mae_et.data.jpeg``, nvjpeg on
CUDA) and crops the micro-batch as the memory pipeline does (``mae_et.data.on_device``), for data sets too big to
decode once and keep.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from mae_et.data.folder import DataError, ImageFolderIndex, PretrainBatch, StepSampler, load_rgb, step_loader
from mae_et.data.jpeg import decode_jpegs, jpeg_device_decodable
from mae_et.data.on_device import StepCrops, crop_resize_flip, to_device
from mae_et.notices import DataWarning

_MAX_GRID_DOWNSCALE = 2.0  # boxes shrinking more than this get an antialiased resize first
_MAX_CONSECUTIVE_FAILURES = 50  # as PretrainDataset: this many unreadable files in a row = wrong folder


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


def _as_rgb(image: Tensor) -> Tensor:
    """(C, H, W) uint8 -> (3, H, W): grey is repeated (decoders asked for RGB normally return 3 already)."""
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    return image[:3]


def _shrink_if_large(crop: Tensor, out_size: int) -> Tensor:
    """A crop larger than _MAX_GRID_DOWNSCALE x the output, resized to (S, S) with antialias here: grid_sample would
    alias (its later pass over this slot is then an identity plus flip)."""
    _, h, w = crop.shape
    if max(h, w) <= _MAX_GRID_DOWNSCALE * out_size:
        return crop
    small = F.interpolate(
        crop[None].to(torch.float32), size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True
    )  # (1, 3, S, S) float32
    return small[0].round_().clamp_(0, 255).to(torch.uint8)  # (3, S, S)


def crops_on_canvas(images: Sequence[Tensor], boxes: list[list[int]], out_size: int) -> tuple[Tensor, Tensor]:
    """Cut each box (host [top, left, h, w]) out of its image (3, H_i, W_i), shrinking big ones, onto one zero-padded
    uint8 canvas (N, 3, Hmax, Wmax), each crop at the top-left; returns it and the crops' sizes (N, 2) on the host.
    Cutting first bounds the canvas by the largest box, not the largest image."""
    crops = []
    for image, (top, left, h, w) in zip(images, boxes):
        crops.append(_shrink_if_large(image[:, top : top + h, left : left + w], out_size))  # (3, h', w')
    sizes = torch.tensor([[c.shape[1], c.shape[2]] for c in crops], dtype=torch.int64)  # (N, 2) host
    max_h, max_w = max(c.shape[1] for c in crops), max(c.shape[2] for c in crops)
    canvas = torch.zeros((len(crops), 3, max_h, max_w), dtype=torch.uint8, device=images[0].device)  # (N, 3, Hm, Wm)
    for i, c in enumerate(crops):
        canvas[i, :, : c.shape[1], : c.shape[2]] = c
    return canvas, sizes


class DeviceDecodeBatchSource(StepCrops):
    """``PretrainBatch`` stream for data sets too big for memory: workers read the sampler's files, the device
    decodes them (``decode_jpegs``) and crops them in one ``crop_resize_flip``.

    A file the device decoder cannot take is decoded on the CPU; one neither decodes is warned about and reported
    once, and replaced by the next readable index, as ``PretrainDataset`` does (``strict=True``: a ``DataError``).
    Boxes come from a CPU generator: the image sizes are host metadata, so no device sync is needed."""

    def __init__(
        self,
        index: ImageFolderIndex,
        sampler: StepSampler,
        crop_size: int,
        device: torch.device | str,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        strict: bool = False,
        num_workers: int = 4,
    ) -> None:
        super().__init__(sampler, crop_size, scale, ratio, hflip, torch.Generator())
        self.index = index
        self.device = torch.device(device)
        self.strict = strict
        self._known_bad: set[str] = set()  # one process decodes, so each bad file is reported once
        self.loader = step_loader(_FileBytesDataset(index.samples), sampler, num_workers, collate_fn=_collate_bytes)
        self._batches: Iterator[_RawBatch] | None = None

    def __next__(self) -> PretrainBatch:
        if self._batches is None:
            self._batches = iter(self.loader)
        raw = next(self._batches)  # StopIteration ends the stream
        images, labels, bad = self._decode_batch(raw)  # B tensors (3, H_i, W_i) uint8 on the device

        heights = torch.tensor([im.shape[1] for im in images], dtype=torch.int64)  # (B,) host
        widths = torch.tensor([im.shape[2] for im in images], dtype=torch.int64)  # (B,) host
        boxes, flip = self._boxes_and_flips(heights, widths)
        canvas, sizes = crops_on_canvas(images, boxes.tolist(), self.crop_size)  # (B, 3, Hm, Wm), (B, 2)
        local_boxes = torch.cat([torch.zeros_like(sizes), sizes], dim=1)  # (B, 4): each crop at the top-left
        crops = crop_resize_flip(
            canvas,
            to_device(sizes, self.device),
            to_device(local_boxes, self.device),
            to_device(flip, self.device),
            self.crop_size,
        )  # (B, 3, crop, crop) uint8
        self.step += 1
        label_t = to_device(torch.tensor(labels, dtype=torch.int64), self.device)  # (B,)
        return PretrainBatch(images=crops, labels=label_t, bad_files=tuple(bad))

    def _decode_batch(self, raw: _RawBatch) -> tuple[list[Tensor], list[int], list[str]]:
        datas = list(torch.split(raw.data, raw.lengths))  # B views (n_i,) uint8
        paths = [self.index.samples[i][0] for i in raw.indices]
        on_device = [
            i
            for i in range(len(datas))
            if raw.device_ok[i] and not raw.read_errors[i] and paths[i] not in self._known_bad
        ]
        decoded: list[Tensor | None] = [None] * len(datas)
        for i, image in zip(on_device, decode_jpegs([datas[i] for i in on_device], self.device)):
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
        return TF.pil_to_tensor(img).to(self.device), ""  # (3, H, W)

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
            image = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], self.device)[0]
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
