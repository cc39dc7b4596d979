"""Batched JPEG decoding to uint8 tensors, on the CPU or the GPU: TorchCodec where it is installed, torchvision's
decoder otherwise.

torchvision deprecated its image decoders in 0.29 in favour of TorchCodec (>= 0.16), whose `decode_jpeg` takes the
same bytes and devices (nvjpeg on CUDA) and returns the same pixels (tested on CPU). TorchCodec is optional (its
wheels follow torch releases closely), so torchvision stays the fallback; `DECODER` names the one in use.

    decode_jpegs(datas, device) -> [(3, H, W) uint8 | None]   (None: that one failed to decode)
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
