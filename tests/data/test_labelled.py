"""mae_et.data.labelled: the evaluation loader keeps the train split's class mapping and names a missing class."""

from __future__ import annotations

import pytest
import torch
from helpers import make_split

from mae_et.data.folder import DataError
from mae_et.data.labelled import build_eval_loader


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
