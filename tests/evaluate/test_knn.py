"""python -m mae_et.evaluate.knn: the command end to end, its values and its --json checked before any work."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_split

from mae_et.checkpoint import list_checkpoints
from mae_et.evaluate.knn import main as knn_main


def test_knn_cli(micro_run, tmp_path, mini_root, capsys):
    data = tmp_path / "data"
    make_split(data / "train", {"x": 3, "y": 3}, mini_root)
    make_split(data / "val", {"x": 1, "y": 1}, mini_root)
    out = tmp_path / "knn.json"
    assert knn_main([str(micro_run), "--data", str(data), "--num-workers", "0", "--k", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "knn_top1_cls:" in printed and "knn_top1_mean:" in printed
    saved = json.loads(out.read_text())
    assert 0 <= saved["knn_top1_cls"] <= 100 and saved["img_size"] == 48
    with pytest.raises(SystemExit) as e:
        knn_main([str(micro_run), "--data", str(data), "--val-split", "test"])
    assert e.value.code == 2 and "--val-split" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--k", "0"], "--k must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
        (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
        (["--device", "cuda"], "--device cuda needs a GPU, and torch sees none here; use --device cpu"),
    ],
)
def test_knn_cli_values_are_checked_before_any_work(micro_run, mini_root, capsys, flags, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU this test means, on any machine
    called = []
    monkeypatch.setattr("mae_et.evaluate.knn.load_pretrained_vit", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit) as e:
        knn_main([str(micro_run), "--data", str(mini_root), *flags])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}" and not called


def test_knn_json_is_checked_before_the_work_and_never_replaced_unasked(
    micro_run, mini_root, tmp_path, capsys, monkeypatch
):
    called = []
    monkeypatch.setattr("mae_et.evaluate.knn.load_pretrained_vit", lambda *a, **k: called.append(1))
    for target, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "x.txt", "must end with .json"),
        (list_checkpoints(micro_run / "checkpoints")[-1] / "knn.json", "which this command reads"),
        (mini_root / "val" / "knn.json", "lies inside"),
    ):
        with pytest.raises(SystemExit):
            knn_main([str(micro_run), "--data", str(mini_root), "--json", str(target)])
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --json") and message in err, err
    existing = tmp_path / "knn.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        knn_main([str(micro_run), "--data", str(mini_root), "--json", str(existing)])
    assert "exists; pass --overwrite" in capsys.readouterr().err and existing.read_text() == "{}" and not called


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--val-split", "train"], "are the same folder"),  # scored its own bank: 74% where held-out images give 24%
        (["--val-split", "./train/"], "are the same folder"),
        (["--train-split", "", "--val-split", "val"], "overlap"),  # the bank holds val/ itself
    ],
)
def test_knn_refuses_to_score_its_own_bank(mini_root, tmp_path, capsys, monkeypatch, flags, says):
    called = []
    monkeypatch.setattr("mae_et.evaluate.knn.load_pretrained_vit", lambda *a, **k: called.append(1))
    with pytest.raises(SystemExit) as e:
        knn_main([str(tmp_path), "--data", str(mini_root), *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --train-split (") and says in err and not called
    assert "training images" in err and "\n" not in err
