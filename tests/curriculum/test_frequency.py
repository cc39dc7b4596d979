"""Tests for mae_et.curriculum.frequency.low_frequency_crop."""

from __future__ import annotations

import glob
import math

import numpy as np
import pytest
import torch
from helpers import MINI
from PIL import Image

from mae_et.curriculum.frequency import FREQUENCY_MODES, low_frequency_crop

IMAGENETTE = MINI / "train"  # ../shared beside the checkout, wherever that is


def _cosine(n: int, kx: int, ky: int, amp: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """(1, 1, n, n) float64 image of a 2-D cosine with kx, ky cycles across the image."""
    i = torch.arange(n, dtype=torch.float64)
    phase = 2 * math.pi * (ky * i[:, None] + kx * i[None, :]) / n  # (n, n)
    return (offset + amp * torch.cos(phase))[None, None]


def _real_images(n: int = 6, side: int = 224) -> torch.Tensor:
    """(n, 3, side, side) float32 in [0, 1]: the first JPEG of the first n classes."""
    classes = sorted(glob.glob(f"{IMAGENETTE}/*/"))
    if len(classes) < n:
        pytest.fail(f"test data missing: {IMAGENETTE} (the shared/ folder must sit beside the repository)")
    imgs = []
    for cls in classes[:n]:
        path = sorted(glob.glob(f"{cls}*"))[0]
        im = Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0)  # (3, side, side)
    return torch.stack(imgs)


@pytest.mark.parametrize("mode", FREQUENCY_MODES)
@pytest.mark.parametrize("size", [1, 7, 16, 31, 48])
def test_constant_stays_constant(mode: str, size: int) -> None:
    x = torch.full((2, 3, 64, 64), 0.37)
    y = low_frequency_crop(x, size, mode)
    assert y.shape == (2, 3, size, size)
    assert torch.allclose(y, torch.full_like(y, 0.37), atol=1e-5)


@pytest.mark.parametrize("k", [(1, 0), (3, 2), (0, 5), (7, 7)])
@pytest.mark.parametrize("size", [16, 17, 32])
def test_low_cosine_survives_exactly(k: tuple[int, int], size: int) -> None:
    kx, ky = k
    assert max(kx, ky) < size / 2
    x = _cosine(64, kx, ky, amp=0.8, offset=0.1)
    y = low_frequency_crop(x, size, "fft")
    # Same number of cycles over `size` pixels, same amplitude and mean.
    assert torch.allclose(y, _cosine(size, kx, ky, amp=0.8, offset=0.1), atol=1e-10)


@pytest.mark.parametrize("k", [(9, 0), (0, 12), (10, 10), (20, 3)])
def test_high_cosine_vanishes(k: tuple[int, int]) -> None:
    kx, ky = k
    size = 16
    assert max(kx, ky) > size / 2
    x = _cosine(64, kx, ky, amp=1.0, offset=0.25)
    y = low_frequency_crop(x, size, "fft")
    assert torch.allclose(y, torch.full_like(y, 0.25), atol=1e-10)


@pytest.mark.parametrize("mode", FREQUENCY_MODES)
def test_mean_preserved(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g)
    for size in (8, 24, 33, 63):
        y = low_frequency_crop(x, size, mode)
        tol = 1e-5 if mode == "fft" else 2e-2  # bicubic only preserves the mean approximately
        assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=tol)


def test_resize_close_to_fft_on_real_images() -> None:
    x = _real_images()  # (6, 3, 224, 224)
    # Measured on these images (batch relative L2): about 0.10 at 96, 0.05 at 160, 0.03 at 192.
    for size, bound in ((96, 0.15), (160, 0.08), (192, 0.05)):
        a = low_frequency_crop(x, size, "fft")
        b = low_frequency_crop(x, size, "resize")
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < bound, (size, rel)


def test_linear_and_commutes_with_normalisation() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 48, 48, generator=g, dtype=torch.float64)
    y = torch.rand(2, 3, 48, 48, generator=g, dtype=torch.float64)
    a, b = 0.7, -1.3
    lhs = low_frequency_crop(a * x + b * y, 20)
    rhs = a * low_frequency_crop(x, 20) + b * low_frequency_crop(y, 20)
    assert torch.allclose(lhs, rhs, atol=1e-12)

    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[None, :, None, None]  # (1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)[None, :, None, None]
    crop_then_norm = (low_frequency_crop(x, 20) - mean) / std
    norm_then_crop = low_frequency_crop((x - mean) / std, 20)
    assert torch.allclose(crop_then_norm, norm_then_crop, atol=1e-12)


def test_uint8_input() -> None:
    x8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for mode in FREQUENCY_MODES:
        y = low_frequency_crop(x8, 16, mode)
        assert y.dtype == torch.float32 and y.shape == (2, 3, 16, 16)
        assert torch.allclose(y, low_frequency_crop(x8.float(), 16, mode))
    same = low_frequency_crop(x8, 32)
    assert same.dtype == torch.float32 and torch.equal(same, x8.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_kept(dtype: torch.dtype) -> None:
    x = torch.rand(1, 3, 32, 32).to(dtype)
    for mode in FREQUENCY_MODES:
        y = low_frequency_crop(x, 16, mode)
        assert y.dtype == dtype
        ref = low_frequency_crop(x.double(), 16, mode)
        assert torch.allclose(y.double(), ref, atol=2e-2)


def test_full_size_is_identity() -> None:
    x = torch.rand(2, 3, 32, 32)
    for mode in FREQUENCY_MODES:
        assert torch.equal(low_frequency_crop(x, 32, mode), x)


def test_bad_arguments_raise() -> None:
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"crop size 33 .*input size 32"):
        low_frequency_crop(x, 33)
    with pytest.raises(ValueError, match=r"crop size 0 .*input size 32"):
        low_frequency_crop(x, 0)
    with pytest.raises(ValueError, match=r"square.*32x40"):
        low_frequency_crop(torch.rand(1, 3, 32, 40), 16)
    with pytest.raises(ValueError, match=r"unknown frequency mode 'dct'.*fft, resize"):
        low_frequency_crop(x, 16, "dct")
    with pytest.raises(ValueError, match=r"batch \(N, C, H, W\)"):
        low_frequency_crop(torch.rand(3, 32, 32), 16)
