"""Batched JPEG decoding to uint8 tensors, on the CPU or the GPU: TorchCodec where it is installed, else torchvision
(which deprecated its decoders in 0.29 for TorchCodec: the same bytes, devices and pixels; TorchCodec's wheels follow
torch releases closely, so it stays optional). `DECODER` names the one in use.

    decode_jpegs(datas, device) -> [(3, H, W) uint8 | None]   (None: that one failed to decode)
    jpeg_device_decodable(data) -> whether the batched device decoder takes the file (from its headers)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _torchcodec() -> Callable | None:
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # noqa: BLE001 - not installed, or built for another torch (its import fails then)
        return None
    return decode_jpeg


def _torchvision(datas, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision >= 0.29 warns on every call that its decoders move to TorchCodec; one warning per image
        # would drown the real ones (bad files)
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


_TORCHCODEC = _torchcodec()
DECODER = "torchcodec" if _TORCHCODEC is not None else "torchvision"


def _decode(datas, device: torch.device, decoder: str):
    if decoder == "torchcodec":
        return _TORCHCODEC(datas, mode="RGB", device=device)
    return _torchvision(datas, device)


def decode_jpegs(datas: Sequence[Tensor], device: torch.device, decoder: str | None = None) -> list[Tensor | None]:
    """Decode a batch of JPEG byte tensors (1-D uint8, on the CPU) to RGB (3, H, W) uint8 on `device`, batched
    (one nvjpeg call on CUDA); when the batch call fails, one by one, so one bad file costs one image (None).
    `decoder`: "torchcodec" | "torchvision"; default `DECODER`."""
    decoder = decoder or DECODER
    if decoder == "torchcodec" and _TORCHCODEC is None:
        raise ValueError("decoder 'torchcodec' is not installed here (pip install torchcodec)")
    if not datas:
        return []
    try:
        return list(_decode(list(datas), device, decoder))
    except Exception:  # noqa: BLE001 - all-or-nothing batch call: find the culprit(s) below
        pass
    out: list[Tensor | None] = []
    for d in datas:
        try:
            out.append(_decode(d, device, decoder))
        except Exception:  # noqa: BLE001 - each decoder raises its own types for corrupt data
            out.append(None)
    return out


_SOF_DEVICE_OK = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive Huffman frames
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless / hierarchical / arithmetic


def jpeg_device_decodable(data: bytes) -> bool:
    """Whether ``data`` looks like a JPEG the batched device decoder handles: 8-bit, 1 or 3 components, read from
    the marker headers up to the frame header. CMYK, 12-bit, lossless and arithmetic-coded JPEGs and non-JPEGs go
    to the CPU decoder instead of failing the whole batched call."""
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
