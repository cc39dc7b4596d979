"""The one protocol every image source keeps: chosen by name, micro-batches of uint8 crops for a rank, from any
micro-step on (the resume contract), skipped files reported."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import MINI, make_bad_folder

from mae_et.data.sources import SOURCES, data_dir, open_source, source_name


def data_section(root, pipeline: str, source: str = "imagefolder") -> SimpleNamespace:
    """The attributes of a config's `data` section the sources read (they import no config class)."""
    return SimpleNamespace(root=str(root), split="train", source=source, pipeline=pipeline, crop_size=32,
                           scale=(0.2, 1.0), hflip=True, strict=False, num_workers=0, pin_memory=False,
                           memory_size=None, memory_on_device=False, fractal_classes=4, fractal_images_per_class=8)


CASES = [("loader", "imagefolder"), ("memory", "imagefolder"), ("device_decode", "imagefolder"), ("loader", "fractal")]


def test_every_name_the_config_allows_has_a_source():
    from mae_et.train.config import PIPELINES

    assert set(SOURCES) == {*PIPELINES, "fractal"}
    assert source_name(data_section(MINI, "memory")) == "memory"
    assert source_name(data_section(MINI, "memory", source="fractal")) == "fractal"
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
