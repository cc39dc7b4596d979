"""Low-frequency cropping of image batches, the EfficientTrain input transform: `fft` keeps the centred B x B block
of the spectrum (ET's exact operation), `resize` is anti-aliased bicubic downsampling (ET++'s cheaper stand-in),
both on the whole batch on its device."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

FrequencyMode = Literal["fft", "resize"]  # the recipe key curriculum.mode
FREQUENCY_MODES: tuple[str, ...] = get_args(FrequencyMode)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype to do the arithmetic in: float32 at least, float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def low_frequency_crop(x: Tensor, size: int, mode: str = "fft") -> Tensor:
    """Crop the lowest `size x size` frequencies of a square batch (N, C, H, H).

    Returns (N, C, size, size) in x's float dtype (float32 for integer input),
    on x's device.
    """
    if mode not in FREQUENCY_MODES:
        raise ValueError(f"unknown frequency mode {mode!r}; valid modes: {', '.join(FREQUENCY_MODES)}")
    if x.dim() != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2], x.shape[-1]
    if h != w:
        raise ValueError(f"low_frequency_crop needs square images, got {h}x{w}")
    if not 1 <= size <= h:
        raise ValueError(f"crop size {size} must be in [1, {h}] (input size {h})")

    # Integer images (uint8 from the loader) become float32; float dtypes are kept for the output.
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    if size == h:
        return x.to(out_dtype)

    # Half precision has too little mantissa for an FFT / bicubic sum: compute in float32.
    xf = x.to(_compute_dtype(out_dtype))  # (N, C, H, H)

    if mode == "resize":
        y = F.interpolate(xf, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        return y.to(out_dtype)  # (N, C, size, size)

    spec = torch.fft.fftshift(torch.fft.fft2(xf), dim=(-2, -1))  # (N, C, H, H) complex, DC at H//2
    # Start chosen so the DC bin lands at index size//2 of the block, where ifftshift expects it.
    start = h // 2 - size // 2
    block = spec[..., start : start + size, start : start + size]  # (N, C, size, size)
    y = torch.fft.ifft2(torch.fft.ifftshift(block, dim=(-2, -1))).real  # (N, C, size, size)
    # ifft2 divides by size^2 where fft2 summed over H^2 pixels: rescale so the mean (DC) is kept.
    y = y * ((size / h) ** 2)
    return y.to(out_dtype)
