"""mae_et.data.labelled: the evaluation loader keeps the train split's class mapping and names a missing class."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO, make_split, plain_user_prefix

from mae_et.data.folder import DataError, load_rgb
from mae_et.data.labelled import (
    SeededClassificationDataset,
    build_eval_loader,
    linprobe_train_transform,
    scan_train_split,
    seeded_rng,
)
from mae_et.notices import DataWarning
from mae_et.seeding import Family, mix64


def test_val_split_missing_a_class_names_it(tmp_path, mini_root):
    train = make_split(tmp_path / "train", {"apple": 1, "banana": 1, "cherry": 1}, mini_root)
    val = make_split(tmp_path / "val", {"apple": 1, "cherry": 1}, mini_root)
    classes = build_eval_loader(train, 32, 4, 0).dataset.classes
    with pytest.raises(DataError, match="lacks the classes banana"):
        build_eval_loader(val, 32, 4, 0, classes=classes)


def test_eval_loader_uses_the_train_mapping(tmp_path, mini_root):
    # Folder "b" only in val would be label 0 by its own listing; the train mapping makes it 1.
    val = make_split(tmp_path / "val", {"b": 2, "c": 1}, mini_root)
    loader = build_eval_loader(val, 40, 2, 0, classes=["c", "b"])
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 40, 40) and images.dtype == torch.float32
    assert labels.tolist() == [1, 1]  # "b" is index 1 of ["c", "b"]
    assert abs(images.mean().item()) < 3  # normalised, not raw 0..255
    with pytest.raises(DataError, match="has classes the train split lacks: b"):
        build_eval_loader(val, 40, 2, 0, classes=["c"])


def test_a_replacement_image_draws_its_own_augmentation(tmp_path, mini_root):
    """An unreadable file is replaced by the next image, augmented from its own seed of the table (not a copy of the
    next key's augmentation), the same on every draw."""
    files = sorted((make_split(tmp_path / "train", {"a": 2}, mini_root) / "a").iterdir())
    files[0].write_bytes(b"not a jpeg at all")
    transform = linprobe_train_transform(32, (0.08, 1.0), True)
    dataset = SeededClassificationDataset(scan_train_split(tmp_path, "train"), transform)
    with pytest.warns(DataWarning, match="cannot decode"):
        replaced, label = dataset[(0, 7)]
    with seeded_rng(mix64(Family.LABELLED_RETRY, 7, 1)):
        expected = transform(load_rgb(str(files[1])))
    assert label == 0 and torch.equal(replaced, expected) and torch.equal(dataset[(0, 7)][0], replaced)
    assert not torch.equal(replaced, dataset[(1, 7)][0])


# For each root given: its train split's images and skipped folders, then the val split's images; or the error line.
SPLITS_AS_A_USER = """
import sys
from mae_et.data.labelled import build_eval_loader, scan_train_split
from mae_et.errors import UserError
for root in sys.argv[1:]:
    try:
        train = scan_train_split(root, "train")
        print(len(train.samples), len(train.skipped))
        print(len(build_eval_loader(root + "/val", 32, 4, 0, classes=train.classes).dataset))
    except UserError as e:
        print("error:", e)
"""


def test_unreadable_class_folders_are_skipped_with_a_warning_and_an_unreadable_root_is_one_line(tmp_path, mini_root):
    """As a user who is not root (file permissions bind): a class folder they may not list is named and counted
    as skipped (the class keeps its label), a data.root they may not list is one line (both in one process)."""
    prefix = plain_user_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot run as a user whom file permissions bind (setpriv missing or not allowed)")
    root, locked_root = tmp_path / "data", tmp_path / "locked"
    make_split(root / "train", {"a": 2, "b": 2}, mini_root)
    make_split(root / "val", {"a": 1, "b": 1}, mini_root)
    make_split(locked_root / "train", {"a": 1}, mini_root)
    (root / "train" / "b").chmod(0)
    locked_root.chmod(0)
    try:
        run = [*prefix, sys.executable, "-c", SPLITS_AS_A_USER, str(root), str(locked_root)]
        proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = proc.stdout.strip().splitlines()
        assert lines[:2] == ["2 1", "2"], proc.stdout + proc.stderr
        assert f"skipping '{root / 'train' / 'b'}': cannot be read" in proc.stderr
        assert len(lines) == 3 and lines[2].startswith(f"error: data.root '{locked_root}' cannot be read"), proc.stdout
    finally:
        locked_root.chmod(0o755)
        (root / "train" / "b").chmod(0o755)
