"""Tests for mae_et.data.on_device: batched RRC boxes, batched crop/resize/flip, the in-memory source, and the
memory, device-decode and loader paths against each other.

Everything runs on CPU tensors here (the same code runs on CUDA). The fast paths draw their crops
from a per-micro-step generator, so they are compared with the loader path by STATISTICS, and with
themselves (determinism, resume, sharding) exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MINI, copy_mini_classes, write_broken
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from mae_et.data.device_decode import DeviceDecodeBatchSource
from mae_et.data.folder import (
    DataError,
    ImageFolderIndex,
    PretrainDataset,
    StepSampler,
    load_rgb,
    sample_crop_params,
    scan_image_folder,
)
from mae_et.data.on_device import (
    InMemoryImages,
    MemoryBatchSource,
    crop_resize_flip,
    random_crops_and_flips,
    random_resized_crop_boxes,
)

TRAIN = MINI / "train"

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_index() -> ImageFolderIndex:
    return scan_image_folder(TRAIN)


@pytest.fixture(scope="module")
def store(train_index: ImageFolderIndex) -> InMemoryImages:
    # Stored at the source size (224): no resize, so the store holds the decoded images themselves.
    return InMemoryImages(train_index, store_size=224, device="cpu", num_workers=2)


def _smooth_image(n: int, h: int, w: int) -> torch.Tensor:
    """uint8 (n, 3, h, w) of slow sinusoids: bilinear resampling of it is nearly exact."""
    y = torch.arange(h, dtype=torch.float32)[:, None]  # (h, 1)
    x = torch.arange(w, dtype=torch.float32)[None, :]  # (1, w)
    chans = []
    for c in range(3):
        chans.append(127.5 + 60 * torch.sin(x / (9 + c)) + 50 * torch.cos(y / (7 + 2 * c)))  # (h, w)
    img = torch.stack(chans)[None].expand(n, -1, -1, -1)  # (n, 3, h, w)
    return img.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------


def _box_stats(boxes: torch.Tensor, h: int, w: int) -> dict[str, float]:
    area = (boxes[:, 2] * boxes[:, 3]).double() / (h * w)  # (N,)
    log_ar = torch.log(boxes[:, 3].double() / boxes[:, 2].double())  # (N,) log(w/h)
    cy = (boxes[:, 0] + boxes[:, 2] / 2).double() / h  # (N,) box centre, relative
    cx = (boxes[:, 1] + boxes[:, 3] / 2).double() / w
    return {
        "area_mean": area.mean().item(),
        "area_std": area.std().item(),
        "log_ar_mean": log_ar.mean().item(),
        "log_ar_std": log_ar.std().item(),
        "cy": cy.mean().item(),
        "cx": cx.mean().item(),
    }


@pytest.mark.parametrize("hw", [(224, 224), (375, 500)])
def test_box_statistics_match_cpu_path(hw: tuple[int, int]) -> None:
    h, w = hw
    n = 4000
    g = torch.Generator().manual_seed(0)
    boxes = random_resized_crop_boxes(torch.full((n,), h), torch.full((n,), w), SCALE, RATIO, g)  # (n, 4)
    assert boxes.shape == (n, 4) and boxes.dtype == torch.int64
    # Inside the image, non-empty.
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()
    assert (boxes[:, 0] + boxes[:, 2] <= h).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()

    ref = torch.tensor([sample_crop_params(h, w, SCALE, RATIO, torch.Generator().manual_seed(i)) for i in range(n)])
    got, want = _box_stats(boxes, h, w), _box_stats(ref, h, w)
    # Tolerances ~4.5 standard errors of a difference of two independent 4000-sample estimates:
    # area fraction std ~0.20 -> s.e.(mean diff) = 0.20*sqrt(2/4000) = 0.0045; s.e. of a std for a
    # near-uniform variable ~ sigma*sqrt(0.8/(4n)) -> diff 0.0022; log aspect std ~0.16 -> 0.0036;
    # relative centre std ~0.12 -> 0.0027.
    assert got["area_mean"] == pytest.approx(want["area_mean"], abs=0.02)
    assert got["area_std"] == pytest.approx(want["area_std"], abs=0.01)
    assert got["log_ar_mean"] == pytest.approx(want["log_ar_mean"], abs=0.016)
    assert got["log_ar_std"] == pytest.approx(want["log_ar_std"], abs=0.01)
    assert got["cy"] == pytest.approx(want["cy"], abs=0.012)
    assert got["cx"] == pytest.approx(want["cx"], abs=0.012)
    # And both agree with the algorithm's known shape: areas in [0.2, 1], aspect inside the ratio range.
    area = (boxes[:, 2] * boxes[:, 3]).double() / (h * w)
    assert area.min() > 0.19 and area.max() <= 1.0
    ar = boxes[:, 3].double() / boxes[:, 2].double()
    assert ar.min() > 0.74 and ar.max() < 1.35  # 3/4 .. 4/3 up to integer rounding


def test_box_sizes_differ_per_sample() -> None:
    # Mixed source sizes in one call: every box stays inside its own image.
    g = torch.Generator().manual_seed(1)
    heights = torch.tensor([224, 375, 500, 60, 1000] * 200)  # (1000,)
    widths = torch.tensor([224, 500, 375, 900, 30] * 200)
    boxes = random_resized_crop_boxes(heights, widths, SCALE, RATIO, g)
    assert (boxes[:, 0] + boxes[:, 2] <= heights).all() and (boxes[:, 1] + boxes[:, 3] <= widths).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()


@pytest.mark.parametrize(
    "hw,scale,ratio",
    [
        ((224, 224), (0.99, 1.0), (3.0, 4.0)),  # too wide a ratio for a square: narrowed in height
        ((375, 500), (0.99, 1.0), (0.2, 0.3)),  # too tall a ratio for a wide image: narrowed in width
        ((375, 500), (0.99, 1.0), (1.0, 1.0)),  # a square box never has 99% of a 4:3 image
    ],
)
def test_box_fallback_is_torchvision_centre_crop(hw, scale, ratio) -> None:
    h, w = hw
    g = torch.Generator().manual_seed(2)
    boxes = random_resized_crop_boxes(torch.full((64,), h), torch.full((64,), w), scale, ratio, g)
    want = sample_crop_params(h, w, scale, ratio, torch.Generator().manual_seed(0))
    assert all(tuple(b) == want for b in boxes.tolist())


def test_flip_rate() -> None:
    n = 4000
    hw = torch.full((n,), 224)
    _, flip = random_crops_and_flips(hw, hw, SCALE, RATIO, True, torch.Generator().manual_seed(3))
    assert flip.dtype == torch.bool
    # s.e. of a rate of 0.5 over 4000 draws = 0.0079; 0.03 is ~4 s.e.
    assert flip.float().mean().item() == pytest.approx(0.5, abs=0.03)
    boxes_on, _ = random_crops_and_flips(hw, hw, SCALE, RATIO, True, torch.Generator().manual_seed(3))
    boxes_off, flip_off = random_crops_and_flips(hw, hw, SCALE, RATIO, False, torch.Generator().manual_seed(3))
    assert not flip_off.any()
    assert torch.equal(boxes_on, boxes_off)  # switching flips off does not move the boxes


# ----------------------------------------------------------------------------------------------
# crop_resize_flip
# ----------------------------------------------------------------------------------------------


def test_full_box_matches_bilinear_interpolate() -> None:
    img = _smooth_image(2, 48, 64)  # (2, 3, 48, 64)
    boxes = torch.tensor([[0, 0, 48, 64]] * 2)
    no_flip = torch.zeros(2, dtype=torch.bool)
    for out in (40, 96):  # downscale and upscale
        got = crop_resize_flip(img, None, boxes, no_flip, out)  # (2, 3, out, out)
        want = F.interpolate(img.float(), size=(out, out), mode="bilinear", align_corners=False, antialias=False)
        assert got.dtype == torch.uint8 and got.shape == (2, 3, out, out)
        assert (got.int() - want.round().int()).abs().max() <= 1  # float rounding of the two paths only


def test_box_matches_crop_then_resize() -> None:
    img = _smooth_image(1, 60, 80)  # (1, 3, 60, 80)
    top, left, h, w = 5, 7, 20, 30
    got = crop_resize_flip(img, None, torch.tensor([[top, left, h, w]]), torch.tensor([False]), 32)
    want = F.interpolate(
        img[:, :, top : top + h, left : left + w].float(), size=(32, 32), mode="bilinear", align_corners=False
    )
    assert (got.int() - want.round().int()).abs().max() <= 1


def test_flip_reverses_last_axis_exactly() -> None:
    g = torch.Generator().manual_seed(4)
    img = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)  # noise: any misplacement shows
    boxes = torch.tensor([[0, 0, 32, 32]] * 3)
    flip = torch.tensor([True, False, True])
    got = crop_resize_flip(img, None, boxes, flip, 32)
    assert torch.equal(got[0], img[0].flip(-1))
    assert torch.equal(got[1], img[1])
    assert torch.equal(got[2], img[2].flip(-1))


def test_padded_canvas_never_read() -> None:
    # Three images of different sizes on one canvas: image pixels 0, padding 255.
    sizes = torch.tensor([[30, 40], [40, 50], [20, 25]])  # (3, 2) true (H, W)
    canvas = torch.full((3, 3, 40, 50), 255, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes.tolist()):
        canvas[i, :, :h, :w] = 0
    boxes = torch.tensor(
        [
            [10, 15, 20, 25],  # touches the bottom-right corner of image 0; upscaled to 64
            [0, 0, 40, 50],  # the whole of image 1 (= the canvas)
            [5, 10, 15, 20],  # overhangs image 2 by 5 px: `sizes` still keeps it off the padding
        ]
    )
    for flip in (torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)):
        for out in (16, 64):
            got = crop_resize_flip(canvas, sizes, boxes, flip, out)
            assert got.max().item() == 0, (out, flip)


# ----------------------------------------------------------------------------------------------
# InMemoryImages
# ----------------------------------------------------------------------------------------------


def test_in_memory_store_mini(train_index: ImageFolderIndex, store: InMemoryImages) -> None:
    assert store.images.shape == (240, 3, 224, 224) and store.images.dtype == torch.uint8
    assert store.labels.dtype == torch.int64
    assert store.labels.tolist() == [label for _, label in train_index.samples]
    assert store.paths == [p for p, _ in train_index.samples]
    assert store.skipped == [] and len(store) == 240
    assert store.nbytes == 240 * 3 * 224 * 224 + 240 * 8
    # At the source size the store holds exactly the decoded image (grayscale ones as 3 channels).
    for i in (0, 100, 239):
        assert torch.equal(store.images[i], pil_to_tensor(load_rgb(store.paths[i])))


def test_in_memory_store_resizes_short_side(tmp_path: Path) -> None:
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    wide = torch.linspace(0, 255, 300).round().to(torch.uint8)[None, None, :].expand(3, 150, 300)  # (3, 150, 300)
    Image.fromarray(wide.permute(1, 2, 0).numpy()).save(root / "a" / "wide.png")
    s = InMemoryImages(scan_image_folder(root), store_size=64, device="cpu", num_workers=0)
    assert s.images.shape == (1, 3, 64, 64)
    # Shorter side 150 -> 64 (x 0.427), long side 300 -> 128, centre 64 columns: the middle of the ramp.
    row = s.images[0, 0, 32].float()  # (64,)
    assert row[0].item() == pytest.approx(255 * 32 / 128, abs=4) and row[-1].item() == pytest.approx(
        255 * 96 / 128, abs=4
    )


def test_in_memory_store_skips_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "train"
    c0, c1 = copy_mini_classes(root, 2, 4)
    write_broken(c0, "corrupt.JPEG")
    write_broken(c1, "truncated.JPEG")
    index = scan_image_folder(root)
    assert len(index.samples) == 10
    with pytest.warns(UserWarning) as record:
        s = InMemoryImages(index, store_size=32, device="cpu", num_workers=2)
    messages = [str(w.message) for w in record]
    assert sum("corrupt.JPEG" in m for m in messages) == 1
    assert sum("truncated.JPEG" in m for m in messages) == 1
    assert sorted(Path(k.path).name for k in s.skipped) == ["corrupt.JPEG", "truncated.JPEG"]
    assert len(s) == 8 and s.images.shape == (8, 3, 32, 32)
    assert not any("corrupt" in p or "truncated" in p for p in s.paths)
    assert s.labels.tolist() == [label for p, label in index.samples if p in set(s.paths)]
    # Strict: the first bad file in index order ('.../<class 0>/corrupt.JPEG') is named.
    with pytest.raises(DataError, match=r"corrupt\.JPEG.*data\.strict=false"):
        InMemoryImages(index, store_size=32, device="cpu", strict=True, num_workers=0)


# ----------------------------------------------------------------------------------------------
# MemoryBatchSource
# ----------------------------------------------------------------------------------------------


def _take(source, n: int) -> list:
    return [next(source) for _ in range(n)]


def _memory(store, micro_batch, rank, world_size, seed, crop_size, start_micro_step=0, num_micro_steps=None):
    sampler = StepSampler(len(store), micro_batch, rank, world_size, seed, start_micro_step, num_micro_steps)
    return MemoryBatchSource(store, sampler, crop_size)


def test_memory_source_batches(store: InMemoryImages) -> None:
    src = _memory(store, micro_batch=16, rank=0, world_size=1, seed=0, crop_size=96, num_micro_steps=3)
    batches = list(src)
    assert len(batches) == 3
    for b in batches:
        assert b.images.shape == (16, 3, 96, 96) and b.images.dtype == torch.uint8
        assert b.labels.shape == (16,) and b.labels.dtype == torch.int64
        assert b.bad_files == ()


def test_memory_source_deterministic_and_resumable(store: InMemoryImages) -> None:
    kw = dict(micro_batch=16, rank=0, world_size=1, seed=7, crop_size=64)
    # 240 / 16 = 15 micro-steps per epoch: steps 0..16 cross into epoch 1.
    full = _take(_memory(store, **kw), 17)
    again = _take(_memory(store, **kw), 17)
    for a, b in zip(full, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    tail = list(_memory(store, **kw, start_micro_step=13, num_micro_steps=4))
    assert len(tail) == 4
    for a, b in zip(full[13:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other_seed = next(_memory(store, **{**kw, "seed": 8}))
    assert not torch.equal(other_seed.images, full[0].images)


def test_memory_source_follows_loader_order(train_index: ImageFolderIndex, store: InMemoryImages) -> None:
    b, world, steps = 8, 2, 20  # 240 / 16 = 15 steps per epoch: crosses an epoch boundary
    for rank in range(world):
        src = _memory(store, micro_batch=b, rank=rank, world_size=world, seed=3, crop_size=32)
        keys = list(StepSampler(len(train_index.samples), b, rank, world, seed=3, num_micro_steps=steps))
        for step in range(steps):
            want = [k[0] for k in keys[step * b : (step + 1) * b]]
            assert src.micro_step_indices(step).tolist() == want
            batch = next(src)
            assert batch.labels.tolist() == [train_index.samples[i][1] for i in want]


def test_crop_statistics_agree_across_paths(train_index: ImageFolderIndex, store: InMemoryImages) -> None:
    # One epoch (240 images, each once) through each path at crop 112; only the crop boxes differ.
    b, crop = 48, 112
    mem = torch.cat([x.images for x in _memory(store, b, 0, 1, seed=1, crop_size=crop, num_micro_steps=5)])
    sampler = StepSampler(len(train_index.samples), b, 0, 1, seed=2, num_micro_steps=5)
    dec = torch.cat([x.images for x in DeviceDecodeBatchSource(train_index, sampler, crop, "cpu", num_workers=0)])
    ds = PretrainDataset(train_index, crop_size=crop)
    keys = list(StepSampler(240, b, 0, 1, seed=3, num_micro_steps=5))
    cpu = torch.stack([ds[k]["image"] for k in keys])  # (240, 3, crop, crop)
    assert mem.shape == dec.shape == cpu.shape == (240, 3, crop, crop)

    def stats(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        # per-channel mean, per-channel std, mean |horizontal gradient| (sharpness)
        return torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)), (x[..., 1:] - x[..., :-1]).abs().mean()[None]])

    s_mem, s_dec, s_cpu = stats(mem), stats(dec), stats(cpu)
    # Same 240 images, different random boxes. Measured over 16 seeds of the three paths: the epoch
    # mean pixel has s.d. ~0.7 grey levels (so a difference of two ~1.0), the pixel std ~0.4, the
    # mean |gradient| ~0.15 (about 10.8 for all three paths: bilinear vs the loader's bicubic barely
    # shows). Bounds of ~4 s.d.: 4 levels, 2 levels, 6%. A channel swap moves the means by ~12 levels,
    # boxes of twice the area move the gradient by ~40%.
    for s_fast in (s_mem, s_dec):
        assert (s_fast[:3] - s_cpu[:3]).abs().max() < 4
        assert (s_fast[3:6] - s_cpu[3:6]).abs().max() < 2
        assert s_fast[6] == pytest.approx(s_cpu[6].item(), rel=0.06)


def test_memory_and_device_decode_paths_agree_exactly(train_index: ImageFolderIndex, store: InMemoryImages) -> None:
    # On CPU both draw boxes from a CPU generator with the same per-step seed; the mini images are all
    # 224 px and stored at 224 unchanged, so the two paths must give the same crops, up to float
    # rounding (coordinates normalised by different canvas sizes). Crop 112: no box exceeds 2 x 112,
    # so the decode path's antialiased pre-shrink never kicks in.
    sampler = StepSampler(len(store), 16, 1, 2, seed=11, num_micro_steps=3)
    mem = list(MemoryBatchSource(store, sampler, crop_size=112))
    dec = list(DeviceDecodeBatchSource(train_index, sampler, 112, "cpu", num_workers=0))
    for a, b in zip(mem, dec, strict=True):
        assert torch.equal(a.labels, b.labels)
        diff = (a.images.int() - b.images.int()).abs()  # (16, 3, 112, 112)
        assert diff.max() <= 1 and diff.float().mean() < 0.01
