"""The one protocol every image source keeps: chosen by name, micro-batches of uint8 crops for a rank, from any
micro-step on (the resume contract), skipped files reported."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import MINI, REPO, copy_mini_classes, make_bad_folder

from mae_et.data.folder import DataError
from mae_et.data.sources import SOURCES, data_dir, open_source, source_name


def data_section(root, pipeline: str, source: str = "imagefolder") -> SimpleNamespace:
    """The attributes of a config's `data` section the sources read (they import no config class)."""
    return SimpleNamespace(
        root=str(root),
        split="train",
        source=source,
        pipeline=pipeline,
        crop_size=32,
        scale=(0.2, 1.0),
        hflip=True,
        strict=False,
        num_workers=0,
        pin_memory=False,
        memory_size=None,
        memory_on_device=False,
        fractal_classes=4,
        fractal_images_per_class=8,
    )


CASES = [("loader", "imagefolder"), ("memory", "imagefolder"), ("device_decode", "imagefolder"), ("loader", "fractal")]


def test_every_name_the_config_allows_has_a_source():
    from mae_et.train.config import PIPELINES

    assert set(SOURCES) == {*PIPELINES, "fractal", "shards"}
    assert source_name(data_section(MINI, "memory")) == "memory"
    assert source_name(data_section(MINI, "memory", source="fractal")) == "fractal"
    assert source_name(data_section(MINI, "loader", source="shards")) == "shards"
    assert data_dir(data_section(MINI, "loader")) == MINI / "train"


@pytest.mark.parametrize("pipeline, source", CASES)
def test_a_source_streams_crops_for_a_rank_from_any_micro_step(pipeline, source):
    d = data_section(MINI, pipeline, source)
    opened = open_source(d, seed=3, main=True, device=torch.device("cpu"))
    assert isinstance(opened, SOURCES[source_name(d)]) and opened.num_images > 0 and len(opened.dataset) > 0
    full = list(opened.batches(rank=1, world=2, micro_batch=4, start_micro_step=0, num_micro_steps=3))
    assert len(full) == 3
    for batch in full:
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 32, 32) and batch.labels.shape == (4,)
    resumed = list(opened.batches(rank=1, world=2, micro_batch=4, start_micro_step=1, num_micro_steps=2))
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other_rank = next(opened.batches(rank=0, world=2, micro_batch=4, start_micro_step=0, num_micro_steps=1))
    assert not torch.equal(other_rank.images, full[0].images)


@pytest.mark.parametrize("pipeline", ["loader", "memory", "device_decode"])
def test_a_source_reports_what_it_skipped(tmp_path, pipeline):
    root = tmp_path / "bad"
    n_bad = make_bad_folder(root / "train")
    with pytest.warns(UserWarning):
        opened = open_source(data_section(root, pipeline), seed=0, main=True, device=torch.device("cpu"))
        met = {p for b in opened.batches(0, 1, 8, 0, 2 * opened.num_images // 8) for p in b.bad_files}
    skipped = {s.path for s in opened.skipped}
    assert len(skipped) >= 2  # the two scan-time files at least (the memory store also skips undecodable ones)
    assert len(skipped | met) == n_bad  # every bad file is either skipped at opening or reported by a batch


@pytest.mark.parametrize("pipeline", ["loader", "memory"])
def test_dangling_symlinks_and_link_loops_are_skipped_and_counted(tmp_path, pipeline):
    """A class folder as it is found on a shared filesystem: a link whose target was deleted, a link to itself.
    Each is one line of warning and one skipped file, like any unreadable file; the run starts."""
    classes = copy_mini_classes(tmp_path / "data" / "train", n_classes=2, n_images=6)
    (classes[0] / "gone.JPEG").symlink_to(tmp_path / "deleted.JPEG")
    (classes[1] / "loop.JPEG").symlink_to(classes[1] / "loop.JPEG")
    (classes[1] / "gone_notes").symlink_to(tmp_path / "nowhere")
    with pytest.warns(UserWarning) as record:
        opened = open_source(data_section(tmp_path / "data", pipeline), seed=0, main=True, device=torch.device("cpu"))
    reasons = {Path(s.path).name: s.reason for s in opened.skipped}
    assert reasons == {
        "gone.JPEG": "dangling symlink (its target does not exist)",
        "loop.JPEG": "symlink loop",
        "gone_notes": "dangling symlink (its target does not exist)",
    }
    lines = [str(w.message) for w in record]
    assert sum("gone.JPEG" in m and "dangling symlink" in m for m in lines) == 1
    assert sum("loop.JPEG" in m and "symlink loop" in m for m in lines) == 1
    assert opened.num_images == 12
    batch = next(opened.batches(0, 1, 4, 0, 1))
    assert batch.images.shape == (4, 3, 32, 32)


def test_a_split_that_is_not_there_is_an_error_naming_the_ones_that_are(tmp_path):
    """data.split=nope on a root of train/ and val/ trained on the root before, val/ as a class: a leak."""
    with pytest.raises(
        DataError,
        match=r"data.split 'nope' is not a folder under '.*imagenette-mini' \(its sub-folders: "
        r"train, val\); pass data.split=<one of them>",
    ):
        data_dir(SimpleNamespace(root=str(MINI), split="nope"))
    # the default train/ absent from a root of splits (val/ only) is the same mistake
    (tmp_path / "val" / "a").mkdir(parents=True)
    (tmp_path / "extra").mkdir()
    with pytest.raises(DataError, match=r"data.split 'train' is not a folder .* \(its sub-folders: extra, val\)"):
        data_dir(SimpleNamespace(root=str(tmp_path), split="train"))
    # a plain folder of classes, with the default split: the root itself; an empty split: the root, always
    assert data_dir(SimpleNamespace(root=str(MINI / "train"), split="train")) == MINI / "train"
    assert data_dir(SimpleNamespace(root=str(MINI / "train"), split="")) == MINI / "train"
    assert data_dir(SimpleNamespace(root=str(MINI), split="val")) == MINI / "val"
    # and in a config: one line when it is loaded, before any work
    from mae_et.train.config import load_pretrain_config

    with pytest.raises(DataError, match="data.split 'nope' is not a folder"):
        load_pretrain_config(
            REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml",
            [f"data.root={MINI}", "data.split=nope"],
        )


@pytest.mark.parametrize("split", ["", ".", "./", "train/.."])
def test_a_root_of_splits_is_never_pretrained_on_whole(split, tmp_path):
    """data.split='' (or any name for the root itself) on a root of train/ and val/ trained on val/ as a class."""
    with pytest.raises(DataError, match=r"holds val/ \(held-out images.*; pass data.split=train$"):
        data_dir(SimpleNamespace(root=str(MINI), split=split))
    # every source opens its folder through it, and a config says so when it is loaded
    with pytest.raises(DataError, match="held-out images"):
        d = SimpleNamespace(**{**vars(data_section(MINI, "loader")), "split": split})
        open_source(d, seed=0, main=True, device=torch.device("cpu"))
    from mae_et.train.config import load_pretrain_config

    with pytest.raises(DataError, match="held-out images"):
        load_pretrain_config(
            REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml",
            [f"data.root={MINI}", f"data.split={split}"],
        )
    if "train" in split:
        return
    # a root without held-out splits is a folder of classes, pretrained on whole
    copy_mini_classes(tmp_path / "classes", n_classes=2, n_images=2)
    classes = data_dir(SimpleNamespace(root=str(tmp_path / "classes"), split=split))
    assert classes.resolve() == (tmp_path / "classes").resolve()


def test_a_root_this_user_may_not_read_is_one_line(tmp_path, monkeypatch):
    """As for a user without read access (we run as root: listing the folder is made to fail as it would)."""
    root = tmp_path / "data"
    copy_mini_classes(root / "train", n_classes=1, n_images=1)
    real_is_dir = Path.is_dir

    def is_dir(self):
        if self.is_relative_to(root) and self != root:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(DataError, match=r"cannot be read \(Permission denied\); give this user read access"):
        data_dir(SimpleNamespace(root=str(root), split="train"))


def test_device_decode_without_a_gpu_says_so_once():
    with pytest.warns(UserWarning) as record:
        opened = open_source(data_section(MINI, "device_decode"), seed=0, main=True, device=torch.device("cpu"))
        next(opened.batches(0, 1, 4, 0, 2))
    said = [str(w.message) for w in record if "device_decode has no GPU here" in str(w.message)]
    assert len(said) == 1 and "data.pipeline=loader" in said[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other ranks say nothing
        open_source(data_section(MINI, "device_decode"), seed=0, main=False, device=torch.device("cpu"))
