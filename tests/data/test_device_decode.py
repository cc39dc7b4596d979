"""Tests for mae_et.data.device_decode: the device-decode source (CPU fallback, bad files, resume, sharding) and
its crops onto one canvas. Everything runs on the CPU here (the same code runs on CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import MINI, copy_mini_classes, write_broken
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from mae_et.data.device_decode import DeviceDecodeBatchSource, crops_on_canvas
from mae_et.data.folder import DataError, ImageFolderIndex, StepSampler, load_rgb, scan_image_folder


@pytest.fixture(scope="module")
def train_index() -> ImageFolderIndex:
    return scan_image_folder(MINI / "train")


@pytest.fixture()
def odd_root(tmp_path: Path) -> Path:
    """Two classes of 6 JPEGs plus a CMYK JPEG, a PNG and a corrupt .JPEG."""
    root = tmp_path / "train"
    c0, c1 = copy_mini_classes(root, 2, 6)
    real = sorted(c0.glob("*.JPEG"))[0]
    rgb = Image.open(real).convert("RGB")
    rgb.convert("CMYK").save(c0 / "cmyk.JPEG", format="JPEG", quality=90)
    rgb.resize((160, 120)).save(c1 / "picture.png")
    write_broken(c1, "corrupt.JPEG")
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_decode_source_fallbacks_and_bad_files(odd_root: Path, num_workers: int) -> None:
    index = scan_image_folder(odd_root)
    assert len(index.samples) == 15
    b = 5  # 3 micro-steps per epoch; 9 steps = 3 epochs, every file visited 3 times
    sampler = StepSampler(len(index.samples), b, 0, 1, seed=0, num_micro_steps=9)
    src = DeviceDecodeBatchSource(index, sampler, crop_size=48, device="cpu", num_workers=num_workers)
    with pytest.warns(UserWarning) as record:
        batches = list(src)
    assert len(batches) == 9
    for batch in batches:
        assert batch.images.shape == (b, 3, 48, 48) and batch.images.dtype == torch.uint8
        assert batch.labels.shape == (b,)
    bad = [p for batch in batches for p in batch.bad_files]
    assert [Path(p).name for p in bad] == ["corrupt.JPEG"]  # reported once over three epochs
    messages = [str(w.message) for w in record]
    assert sum("corrupt.JPEG" in m for m in messages) == 1
    assert not any("cmyk" in m or "picture.png" in m for m in messages)
    # The CPU fallback decodes them exactly like the loader path.
    for name in ("cmyk.JPEG", "picture.png"):
        path = next(p for p, _ in index.samples if p.endswith(name))
        image, error = src._decode_one(path)
        assert error == "" and torch.equal(image, pil_to_tensor(load_rgb(path)))


def test_device_decode_strict_raises(odd_root: Path) -> None:
    index = scan_image_folder(odd_root)
    sampler = StepSampler(len(index.samples), 15, 0, 1, seed=0)
    src = DeviceDecodeBatchSource(index, sampler, crop_size=32, device="cpu", strict=True, num_workers=0)
    with pytest.raises(DataError, match=r"corrupt\.JPEG.*data\.strict=false"):
        next(src)


def test_device_decode_deterministic_resumable_and_sharded(train_index: ImageFolderIndex) -> None:
    n = len(train_index.samples)
    source = DeviceDecodeBatchSource(train_index, StepSampler(n, 8, 1, 2, seed=5), 32, "cpu", num_workers=0)
    full = [next(source) for _ in range(4)]
    sampler = StepSampler(n, 8, 1, 2, seed=5, start_micro_step=2, num_micro_steps=2)
    tail = list(DeviceDecodeBatchSource(train_index, sampler, 32, "cpu", num_workers=0))
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    keys = list(StepSampler(len(train_index.samples), 8, 1, 2, seed=5, num_micro_steps=4))
    assert [lab for b in full for lab in b.labels.tolist()] == [train_index.samples[i][1] for i, _ in keys]


def test_device_decode_batched_failure_retries_file_by_file(tmp_path: Path, monkeypatch) -> None:
    """One file that passes the header check and fails to decode makes the batched call fail; the retry one by
    one decodes the others on the device and the bad one goes to the CPU decoder, fails there too, is reported."""
    import mae_et.data.jpeg as jpeg

    (c0,) = copy_mini_classes(tmp_path, 1, 5)
    [bad] = write_broken(c0, "headers_fine_scan_broken.JPEG")
    assert jpeg.jpeg_device_decodable(bad.read_bytes())
    calls = []
    real_decode = jpeg._decode  # the one call into TorchCodec or torchvision

    def spy(data, *args, **kwargs):
        batched = isinstance(data, list)
        try:
            out = real_decode(data, *args, **kwargs)
        except Exception:
            calls.append(("batch" if batched else "one", "failed"))
            raise
        calls.append(("batch" if batched else "one", "ok"))
        return out

    monkeypatch.setattr(jpeg, "_decode", spy)
    index = scan_image_folder(tmp_path)
    sampler = StepSampler(len(index.samples), 6, 0, 1, seed=0, num_micro_steps=1)
    src = DeviceDecodeBatchSource(index, sampler, crop_size=32, device="cpu", num_workers=0)
    with pytest.warns(UserWarning, match="headers_fine_scan_broken.JPEG"):
        [batch] = list(src)
    assert calls[0] == ("batch", "failed")  # the all-or-nothing call met the bad file
    assert (
        sorted(calls[1:7]) == [("one", "failed")] + [("one", "ok")] * 5
    )  # then one by one: five decoded on the device
    assert [Path(p).name for p in batch.bad_files] == [bad.name]
    assert batch.images.shape == (6, 3, 32, 32)  # its slot was filled by a replacement


def test_large_boxes_are_shrunk_with_antialias() -> None:
    # A 1-px checkerboard shrunk 8x: a plain bilinear grid_sample would alias it to (near) 0 or 255;
    # the antialiased pre-shrink of the decode path gives the local mean, 127.5.
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    board = (((yy + xx) % 2) * 255).to(torch.uint8).expand(3, -1, -1)  # (3, 512, 512)
    small = torch.randint(
        0, 256, (3, 100, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )  # not shrunk (box <= 2 * 64)
    canvas, sizes = crops_on_canvas([board, small], [[0, 0, 512, 512], [10, 10, 80, 90]], out_size=64)
    assert sizes.tolist() == [[64, 64], [80, 90]]
    assert canvas.shape == (2, 3, 80, 90)
    assert (canvas[0, :, :64, :64].float() - 127.5).abs().max() <= 2
    assert torch.equal(canvas[1, :, :80, :90], small[:, 10:90, 10:100])
