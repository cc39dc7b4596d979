"""mae_et.data.jpeg: TorchCodec where installed, torchvision otherwise; the same pixels from both, one bad file
costs one image."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers import MINI
from PIL import Image

from mae_et.data import jpeg

HAS_TORCHCODEC = jpeg._TORCHCODEC is not None


def jpeg_bytes(n: int) -> list[torch.Tensor]:
    files = sorted((MINI / "train").rglob("*.JPEG"))[:n]
    return [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]


def test_the_decoder_in_use_is_torchcodec_exactly_when_it_imports():
    assert jpeg.DECODER == (
        "torchcodec" if importlib.util.find_spec("torchcodec") and HAS_TORCHCODEC else "torchvision"
    )


@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_each_decoder_gives_pil_pixels_on_the_cpu_and_one_bad_file_costs_one_image(decoder):
    if decoder == "torchcodec" and not HAS_TORCHCODEC:
        pytest.skip("torchcodec is not installed here")
    datas = jpeg_bytes(4)
    broken = datas[1][: len(datas[1]) // 3].clone()  # a truncated JPEG
    out = jpeg.decode_jpegs([datas[0], broken, datas[2], datas[3]], torch.device("cpu"), decoder=decoder)
    assert out[1] is None or out[1].shape[0] == 3  # libjpeg may return a partial image for a truncated file
    files = sorted((MINI / "train").rglob("*.JPEG"))[:4]
    for i in (0, 2, 3):
        reference = torch.from_numpy(np.array(Image.open(files[i]).convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
        assert out[i].dtype == torch.uint8 and out[i].shape == reference.shape
        assert (out[i].int() - reference.int()).abs().max() <= 1  # libjpeg's IDCT, within rounding of PIL's


def test_garbage_is_none_not_an_exception():
    garbage = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert jpeg.decode_jpegs([garbage], torch.device("cpu")) == [None]
    assert jpeg.decode_jpegs([], torch.device("cpu")) == []


@pytest.mark.skipif(not HAS_TORCHCODEC, reason="torchcodec is not installed here")
def test_torchcodec_and_torchvision_decode_the_same_pixels():
    datas = jpeg_bytes(6)
    a = jpeg.decode_jpegs(datas, torch.device("cpu"), decoder="torchcodec")
    b = jpeg.decode_jpegs(datas, torch.device("cpu"), decoder="torchvision")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_jpeg_header_sniffing(tmp_path):
    """The batched device decoder gets 8-bit JPEGs of 1 or 3 components; CMYK, PNG and nothing go to the CPU."""
    files = sorted((MINI / "train").rglob("*.JPEG"))
    rgb = Image.open(files[0]).convert("RGB")
    rgb.convert("CMYK").save(tmp_path / "cmyk.JPEG", format="JPEG", quality=90)
    rgb.resize((160, 120)).save(tmp_path / "picture.png")
    assert jpeg.jpeg_device_decodable(files[0].read_bytes())
    assert not jpeg.jpeg_device_decodable((tmp_path / "cmyk.JPEG").read_bytes())  # 4 components
    assert not jpeg.jpeg_device_decodable((tmp_path / "picture.png").read_bytes())
    assert not jpeg.jpeg_device_decodable(b"")
    grey = next(p for p in files if Image.open(p).mode == "L")
    assert jpeg.jpeg_device_decodable(grey.read_bytes())  # 1 component
