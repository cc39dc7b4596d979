"""Tests for mae_et.data.folder: scanning, bad files, reproducible crops, step sampling and sharding."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import MINI, copy_mini_classes, write_broken
from PIL import Image

from mae_et.data.folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageFolderIndex,
    PretrainBatch,
    PretrainDataset,
    StepSampler,
    collate_pretrain,
    load_rgb,
    normalize_on_device,
    sample_crop_params,
    scan_image_folder,
    step_loader,
)

TRAIN = MINI / "train"


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_index() -> ImageFolderIndex:
    return scan_image_folder(TRAIN)


@pytest.fixture()
def bad_root(tmp_path: Path) -> Path:
    """Two small classes copied from imagenette-mini plus every kind of problem file."""
    root = tmp_path / "train"
    c0, c1 = copy_mini_classes(root, 2, 4)
    real = sorted(c0.glob("n*.JPEG"))[0]

    # Scan-time problems ('empty.JPEG' sorts before 'notes.txt': the strict test names the first).
    (c0 / "empty.JPEG").write_bytes(b"")
    write_broken(c0, "notes.txt")
    (c0 / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "README.txt").write_text("files in the root are not samples")
    # Decode-time problems (valid names, non-zero size).
    write_broken(c1, "truncated.JPEG", "fake.jpg")
    # Unusual but valid modes: must load as RGB.
    rgb = Image.open(real).convert("RGB")
    rgb.convert("CMYK").save(c0 / "cmyk.jpg", quality=90)
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(c1 / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(c1 / "rgba.png")
    # A sub-folder inside a class is searched recursively (like torchvision's ImageFolder).
    (c1 / "nested").mkdir()
    shutil.copy(real, c1 / "nested" / "deep.JPEG")
    return root


def _sample_index(index: ImageFolderIndex, name: str) -> int:
    return next(i for i, (p, _) in enumerate(index.samples) if Path(p).name == name)


def _mode(path: str) -> str:
    with Image.open(path) as img:  # header only, no decode
        return img.mode


def _scan_quiet(root: Path, strict: bool = False) -> ImageFolderIndex:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_image_folder(root, strict=strict)


# ----------------------------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------------------------


def test_scan_imagenette_train(train_index: ImageFolderIndex) -> None:
    assert len(train_index.classes) == 10
    assert train_index.classes == sorted(train_index.classes)
    assert len(train_index.samples) == 240
    assert train_index.skipped == []
    paths = [p for p, _ in train_index.samples]
    assert paths == sorted(paths)
    # Label = position of the sample's class folder in `classes`, 24 images each.
    for path, label in train_index.samples:
        assert Path(path).parent.name == train_index.classes[label]
    counts = torch.bincount(torch.tensor([label for _, label in train_index.samples]))
    assert counts.tolist() == [24] * 10


def test_scan_skips_bad_files_with_warnings(bad_root: Path) -> None:
    with pytest.warns(UserWarning) as record:
        index = scan_image_folder(bad_root)
    messages = [str(w.message) for w in record]
    reasons = {Path(s.path).name: s.reason for s in index.skipped}
    assert reasons == {
        "empty.JPEG": "zero-byte file",
        "notes.txt": "not an image extension",
        ".DS_Store": "hidden file",
        "README.txt": "not inside a class folder",
    }
    # One warning per bad file naming it; hidden / root-level files only in one summary warning.
    assert sum("empty.JPEG" in m and "zero-byte" in m for m in messages) == 1
    assert sum("notes.txt" in m and "not an image extension" in m for m in messages) == 1
    assert not any(".DS_Store" in m for m in messages)
    assert sum("skipped 2 hidden" in m for m in messages) == 1

    names = {Path(p).name for p, _ in index.samples}
    assert {"truncated.JPEG", "fake.jpg", "cmyk.jpg", "palette.png", "rgba.png", "deep.JPEG"} <= names
    assert len(index.samples) == 4 + 4 + 6
    assert len(index.classes) == 2


def test_scan_strict_raises_on_first_bad_file(bad_root: Path) -> None:
    # Entries are visited in sorted order, so 'empty.JPEG' comes before 'notes.txt'.
    with pytest.raises(DataError, match=r"empty\.JPEG.*zero-byte.*data\.strict=false"):
        scan_image_folder(bad_root, strict=True)


def test_scan_root_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist.*data\.root="):
        scan_image_folder(tmp_path / "missing")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no class sub-folders.*<class>/<image>"):
        scan_image_folder(empty)

    flat = tmp_path / "flat"  # images directly in the root, no class folders
    flat.mkdir()
    shutil.copy(next(TRAIN.glob("*/*.JPEG")), flat / "a.JPEG")
    (flat / ".hidden_dir").mkdir()  # hidden folders are not classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"no class sub-folders"):
            scan_image_folder(flat)

    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "a.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"no valid image files"):
            scan_image_folder(no_images)


# ----------------------------------------------------------------------------------------------
# Decoding and bad files
# ----------------------------------------------------------------------------------------------


def test_unusual_modes_load_as_rgb(bad_root: Path) -> None:
    index = _scan_quiet(bad_root)
    ds = PretrainDataset(index, crop_size=32)
    for name in ("cmyk.jpg", "palette.png", "rgba.png", "deep.JPEG"):
        item = ds[(_sample_index(index, name), 7)]
        assert item["bad_files"] == ()
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
        assert item["label"] == index.samples[_sample_index(index, name)][1]


def test_decode_failure_replaced_and_reported(bad_root: Path) -> None:
    index = _scan_quiet(bad_root)
    ds = PretrainDataset(index, crop_size=32)
    i = _sample_index(index, "truncated.JPEG")
    with pytest.warns(UserWarning, match=r"truncated\.JPEG"):
        item = ds[(i, 3)]
    assert item["bad_files"] == (index.samples[i][0],)
    assert item["label"] == index.samples[(i + 1) % len(index.samples)][1]
    assert item["image"].shape == (3, 32, 32)
    # Reported once per worker process: drawing it again replaces it silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ds[(i, 3)]
    assert again["bad_files"] == ()
    assert torch.equal(again["image"], item["image"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_reports_each_bad_file(bad_root: Path, num_workers: int) -> None:
    index = _scan_quiet(bad_root)
    ds = PretrainDataset(index, crop_size=32)
    n = len(ds)  # 14: micro_batch 2 covers every index in one epoch
    loader = step_loader(ds, StepSampler(n, 2, 0, 1, seed=0, num_micro_steps=n // 2), num_workers)
    bad: list[str] = []
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in loader:
            assert isinstance(batch, PretrainBatch)
            assert batch.images.shape == (2, 3, 32, 32) and batch.images.dtype == torch.uint8
            assert batch.labels.dtype == torch.int64
            bad.extend(batch.bad_files)
            seen += len(batch.labels)
    assert seen == n
    assert {Path(p).name for p in bad} == {"truncated.JPEG", "fake.jpg"}
    assert len(set(bad)) == 2


def test_strict_decode_raises(bad_root: Path) -> None:
    index = _scan_quiet(bad_root)
    ds = PretrainDataset(index, crop_size=32, strict=True)
    with pytest.raises(DataError, match=r"fake\.jpg.*data\.strict=false"):
        ds[(_sample_index(index, "fake.jpg"), 0)]
    assert ds[(_sample_index(index, "cmyk.jpg"), 0)]["image"].shape == (3, 32, 32)


def test_consecutive_failures_raise(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / "cls").mkdir(exist_ok=True)
        (tmp_path / "cls" / f"bad{k}.jpg").write_text("not a jpeg")
    index = scan_image_folder(tmp_path)
    ds = PretrainDataset(index, crop_size=16, max_consecutive_failures=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"5 consecutive unreadable files starting at .*bad1\.jpg.*data\.root"):
            ds[(1, 0)]


def test_grayscale_gives_identical_channels(train_index: ImageFolderIndex) -> None:
    gray = [i for i, (p, _) in enumerate(train_index.samples) if _mode(p) == "L"]
    assert gray, "imagenette-mini is expected to contain a few grayscale images"
    ds = PretrainDataset(train_index, crop_size=48)
    img = ds[(gray[0], 11)]["image"]
    assert img.dtype == torch.uint8 and img.shape == (3, 48, 48)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    # A colour image does not (sanity check of the assertion above).
    colour = next(i for i in range(len(ds)) if i not in gray)
    c = ds[(colour, 11)]["image"]
    assert not torch.equal(c[0], c[2])


def test_sixteen_bit_grayscale_is_rescaled(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "cls").mkdir()
    arr = np.full((40, 40), 40000, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "cls" / "a.png")  # mode I;16
    ds = PretrainDataset(scan_image_folder(tmp_path), crop_size=8)
    img = ds[(0, 0)]["image"]
    assert int(img.min()) == int(img.max()) == 40000 >> 8  # not clipped at 255


# ----------------------------------------------------------------------------------------------
# Determinism and resume
# ----------------------------------------------------------------------------------------------


def test_same_key_same_pixels(train_index: ImageFolderIndex) -> None:
    ds = PretrainDataset(train_index, crop_size=64)
    a, b = ds[(5, 12345)], ds[(5, 12345)]
    assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
    assert not torch.equal(a["image"], ds[(5, 54321)]["image"])


def _batches(loader, n: int) -> list[PretrainBatch]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_workers_do_not_change_batches(train_index: ImageFolderIndex) -> None:
    ds = PretrainDataset(train_index, crop_size=48)
    sampler = StepSampler(len(ds), 8, 0, 1, seed=3, num_micro_steps=4)
    b0 = list(step_loader(ds, sampler, num_workers=0))
    b2 = list(step_loader(ds, sampler, num_workers=2))
    assert len(b0) == len(b2) == 4
    for x, y in zip(b0, b2):
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.labels, y.labels)


def test_resume_equals_tail(train_index: ImageFolderIndex) -> None:
    n, mb, k = len(train_index.samples), 8, 37  # 30 micro-steps per epoch: k lands in epoch 1
    full = list(StepSampler(n, mb, 0, 1, seed=9, num_micro_steps=45))
    resumed = list(StepSampler(n, mb, 0, 1, seed=9, start_micro_step=k, num_micro_steps=45 - k))
    assert resumed == full[k * mb :]

    ds = PretrainDataset(train_index, crop_size=32)
    from_zero = list(step_loader(ds, StepSampler(n, mb, 0, 1, seed=9, num_micro_steps=k + 2), num_workers=0))
    from_k = list(step_loader(ds, StepSampler(n, mb, 0, 1, 9, start_micro_step=k, num_micro_steps=2), num_workers=0))
    for x, y in zip(from_zero[k:], from_k, strict=True):
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.labels, y.labels)


def test_endless_sampler(train_index: ImageFolderIndex) -> None:
    sampler = StepSampler(10, 3, 0, 1, seed=0)
    with pytest.raises(TypeError):
        len(sampler)
    it = iter(sampler)
    keys = [next(it) for _ in range(3 * 3 * 5)]  # 5 epochs of 3 micro-steps
    assert len(keys) == 45
    assert len(StepSampler(10, 3, 0, 1, seed=0, num_micro_steps=4)) == 12


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------


def test_sharding_matches_single_rank_stream() -> None:
    n, mb, epochs = 50, 4, 3
    single = StepSampler(n, 2 * mb, 0, 1, seed=1)
    steps = single.micro_steps_per_epoch * epochs  # 6 per epoch
    assert single.micro_steps_per_epoch == 50 // 8
    ranks = [list(StepSampler(n, mb, r, 2, seed=1, num_micro_steps=steps)) for r in range(2)]
    assert StepSampler(n, mb, 1, 2, seed=1).micro_steps_per_epoch == single.micro_steps_per_epoch
    ref = list(StepSampler(n, 2 * mb, 0, 1, seed=1, num_micro_steps=steps))
    for m in range(steps):
        global_slice = ref[m * 2 * mb : (m + 1) * 2 * mb]
        assert ranks[0][m * mb : (m + 1) * mb] == global_slice[:mb]
        assert ranks[1][m * mb : (m + 1) * mb] == global_slice[mb:]

    per_epoch = single.micro_steps_per_epoch * mb
    orders = []
    for e in range(epochs):
        idx0 = [i for i, _ in ranks[0][e * per_epoch : (e + 1) * per_epoch]]
        idx1 = [i for i, _ in ranks[1][e * per_epoch : (e + 1) * per_epoch]]
        assert len(set(idx0 + idx1)) == 48  # no repeats within an epoch, 2 images dropped
        assert not set(idx0) & set(idx1)
        orders.append(tuple(idx0 + idx1))
    assert len(set(orders)) == epochs  # each epoch a different permutation
    seeds = [s for r in ranks for _, s in r]
    assert len(set(seeds)) == len(seeds)  # every drawn position gets its own crop seed


def test_sampler_too_small_dataset() -> None:
    with pytest.raises(DataError, match=r"10 images is smaller than one global batch of 16.*train\.batch_size"):
        StepSampler(10, 8, 0, 2, seed=0)
    with pytest.raises(ValueError):
        StepSampler(100, 8, 2, 2, seed=0)


# ----------------------------------------------------------------------------------------------
# Crop statistics and flips
# ----------------------------------------------------------------------------------------------


def test_crop_params_match_torchvision_statistics() -> None:
    draws, scale, ratio = 2000, (0.2, 1.0), (3 / 4, 4 / 3)
    ours = []
    for s in range(draws):
        top, left, h, w = sample_crop_params(224, 224, scale, ratio, torch.Generator().manual_seed(s))
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224
        ours.append(h * w / 224**2)
    torch.manual_seed(0)
    ref = []
    for _ in range(draws):
        _, _, h, w = torchvision.transforms.RandomResizedCrop.get_params(torch.empty(1, 224, 224), scale, ratio)
        ref.append(h * w / 224**2)
    ours_t, ref_t = torch.tensor(ours), torch.tensor(ref)
    assert ours_t.min() >= 0.2 - 0.01 and ours_t.max() <= 1.0  # rounding of h, w: slightly under 0.2
    assert abs(ours_t.mean() - ref_t.mean()) < 0.03
    # Reproducible per generator seed.
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    assert sample_crop_params(300, 200, scale, ratio, g1) == sample_crop_params(300, 200, scale, ratio, g2)


def test_crop_params_fallback_matches_torchvision() -> None:
    # A 10x1000 strip: no random try fits, so both use the centred box clamped to ratio 4/3.
    ours = sample_crop_params(10, 1000, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    ref = torchvision.transforms.RandomResizedCrop.get_params(torch.empty(1, 10, 1000), (0.2, 1.0), (3 / 4, 4 / 3))
    assert ours == tuple(ref) == (0, 493, 10, 13)


def test_flip_rate(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    asym = torch.arange(24 * 24 * 3, dtype=torch.int64).reshape(24, 24, 3) % 251  # no mirror symmetry
    Image.fromarray(asym.to(torch.uint8).numpy(), mode="RGB").save(tmp_path / "cls" / "a.png")
    index = scan_image_folder(tmp_path)
    # Full-image crops so the flip is the only difference between the two datasets.
    flip = PretrainDataset(index, crop_size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    plain = PretrainDataset(index, crop_size=24, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    seeds = [s for _, s in StepSampler(1, 1, 0, 1, seed=5, num_micro_steps=400)]
    flipped = 0
    for s in seeds:
        a, b = flip[(0, s)]["image"], plain[(0, s)]["image"]
        if torch.equal(a, b.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(a, b)
    assert abs(flipped / 400 - 0.5) < 0.1


# ----------------------------------------------------------------------------------------------
# Collate and normalisation
# ----------------------------------------------------------------------------------------------


def test_collate_pretrain() -> None:
    items = [
        {"image": torch.full((3, 4, 4), k, dtype=torch.uint8), "label": k, "bad_files": ("x",) if k else ()}
        for k in range(3)
    ]
    batch = collate_pretrain(items)
    assert batch.images.shape == (3, 3, 4, 4) and batch.images.dtype == torch.uint8
    assert batch.labels.tolist() == [0, 1, 2] and batch.labels.dtype == torch.int64
    assert batch.bad_files == ("x", "x")


def test_normalize_on_device_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g)
    ref = torchvision.transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(images.float() / 255)
    out = normalize_on_device(images, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    half = normalize_on_device(images, IMAGENET_MEAN, IMAGENET_STD, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=1e-2)


# ----------------------------------------------------------------------------- data.decode_size=stage


@pytest.mark.parametrize("size", [96, 160])
def test_a_stage_sized_crop_has_the_same_box_and_flip_and_near_pixels(train_index, monkeypatch, size):
    """crop_at_size draws the box and the flip of the full-size path from the same seed; its pixels (reduced-scale
    decode, one resize to B) stay within a small distance of the full-size path (decode, crop to S, the step's
    antialiased bicubic downsample to B): mean |diff| <= 1.5 levels of 255 over the images, <= 6 on any one."""
    from mae_et.curriculum.frequency import low_frequency_crop
    from mae_et.data import folder

    ds = PretrainDataset(train_index, crop_size=224)
    drawn = []
    real = folder.sample_crop_params
    monkeypatch.setattr(folder, "sample_crop_params", lambda *a: drawn.append(real(*a)) or drawn[-1])
    means = []
    for i, (path, _) in enumerate(train_index.samples[:40]):
        full = ds._crop(load_rgb(path), 500 + i)  # (3, 224, 224)
        small = ds.crop_at_size(path, 500 + i, size)  # (3, B, B)
        assert drawn[-1] == drawn[-2] and small.shape == (3, size, size) and small.dtype == torch.uint8
        expected = low_frequency_crop(full[None], size, "resize")[0].round().clamp(0, 255)  # (3, B, B)
        means.append((expected - small.float()).abs().mean().item())
    assert sum(means) / len(means) <= 1.5 and max(means) <= 6.0, means


def test_a_stage_sized_crop_decodes_large_boxes_at_reduced_scale(train_index, monkeypatch):
    """The JPEG decoder is asked for the coarsest scale that leaves the box >= B pixels: some of the mini set's
    crops at B=96 decode at half size, none at B=224."""
    from PIL import JpegImagePlugin

    asked = []
    real = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real(self, mode, size)
        asked.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    ds = PretrainDataset(train_index, crop_size=224)
    for size in (224, 96):
        asked.clear()
        for i, (path, _) in enumerate(train_index.samples[:40]):
            ds.crop_at_size(path, 900 + i, size)
        reduced = sum(1 for w, h in asked if max(w, h) <= 112)
        assert len(asked) == 40 and (reduced == 0 if size == 224 else reduced > 0), (size, asked)


def test_the_sampler_puts_each_micro_steps_stage_size_in_its_keys(train_index):
    sizes = {0: 96, 1: 96, 2: 160, 3: 224}
    keys = list(StepSampler(len(train_index.samples), 4, 0, 1, 0, num_micro_steps=4, size_at=sizes.__getitem__))
    plain = list(StepSampler(len(train_index.samples), 4, 0, 1, 0, num_micro_steps=4))
    assert [k[:2] for k in keys] == plain  # the same images and seeds, only the size added
    assert [k[2] for k in keys] == [96] * 8 + [160] * 4 + [224] * 4
