"""settle_eval_protocol: the hold-out is a stratified, seeded slice of train that never touches val, and a run on
the mini data scores each encoder's kNN, every probe setting of the grid and the fine-tune on that hold-out."""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import MINI, REPO, reset_accelerate

from benchmarks.settle_eval_protocol import main, make_holdout
from mae_et.data.folder import scan_image_folder

STUDY = REPO / "configs" / "study" / "mini_cpu-smoke.yaml"


def split_names(root: Path) -> dict[str, set[tuple[str, str]]]:
    return {split: {(p.parent.name, p.name) for p in (root / split).rglob("*.JPEG")} for split in ("train", "val")}


def test_holdout_is_a_stratified_seeded_partition_of_train(tmp_path):
    train = scan_image_folder(MINI / "train")
    per_class = Counter(train.classes[label] for _, label in train.samples)
    first = split_names(make_holdout(MINI / "train", 0.25, 0, tmp_path / "a"))

    assert not first["train"] & first["val"]
    assert len(first["train"] | first["val"]) == len(train.samples)
    held = Counter(cls for cls, _ in first["val"])
    assert held == {cls: max(1, round(0.25 * n)) for cls, n in per_class.items()}
    val_names = {(p.parent.name, p.name) for p in (MINI / "val").rglob("*.JPEG")}
    assert not (first["train"] | first["val"]) & val_names  # val is never part of the hold-out or its bank

    assert split_names(make_holdout(MINI / "train", 0.25, 0, tmp_path / "b")) == first
    assert split_names(make_holdout(MINI / "train", 0.25, 1, tmp_path / "c"))["val"] != first["val"]
    # rebuilt in place: a second call with another share replaces the first's links, it does not add to them
    again = split_names(make_holdout(MINI / "train", 0.1, 0, tmp_path / "a"))
    assert len(again["train"] | again["val"]) == len(train.samples)
    assert Counter(cls for cls, _ in again["val"]) == {cls: max(1, round(0.1 * n)) for cls, n in per_class.items()}


def test_a_grid_on_the_mini_data_scores_every_setting_on_the_holdout(tmp_path):
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI}")
    argv = ["--study", str(STUDY), "--data", str(MINI), "--out", str(tmp_path), "--encoders", "untrained"]
    argv += ["--probe-blr", "1", "10", "--probe-epochs", "2", "--probe-batch", "64"]
    argv += ["--finetune-blr", "1e-3", "--finetune-epochs", "1", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            report = main(argv)
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()

    assert json.loads((tmp_path / "settle.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["knn"]) == {"untrained"}
    assert all(0 <= report["knn"]["untrained"][k] <= 100 for k in ("cls", "mean"))
    assert [(row["blr"], row["epochs"], row["global_batch"]) for row in report["probe"]] == [
        (1.0, 2, 64),
        (10.0, 2, 64),
    ]
    assert all(0 <= row["top1"] <= row["best_top1"] <= 100 for row in report["probe"])
    (ft,) = report["finetune"]
    assert (ft["encoder"], ft["blr"], ft["epochs"]) == ("untrained", 1e-3, 1.0)
    assert 0 <= ft["finetune_top1"] <= 100
    md = (tmp_path / "settle.md").read_text()
    assert "| untrained | 10 | 2 | 64 |" in md and "| untrained | 0.001 | 1.0 |" in md
