"""Atomic checkpoints: a kill during a save never leaves the latest one unreadable."""

from __future__ import annotations

import pytest
import torch

from mae_et import checkpoint as ck


def save(root, step, value=1.0, keep_last=3):
    return ck.save_checkpoint(root, step, {"w": torch.full((2, 2), value)}, {"step": step}, "a: 1\n", {"step": step}, keep_last)


def test_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, value=step, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    latest = ck.load_latest_checkpoint(tmp_path)
    assert latest.meta["step"] == 4 and latest.training_state["step"] == 4
    assert torch.equal(latest.model_state["w"], torch.full((2, 2), 4.0))


def test_kill_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert any(p.name.startswith(ck.TMP_PREFIX) for p in tmp_path.iterdir())  # the half-written folder
    latest = ck.load_latest_checkpoint(tmp_path)
    assert latest.meta["step"] == 1  # the half-written one is invisible
    save(tmp_path, 3)
    assert not any(p.name.startswith(ck.TMP_PREFIX) for p in tmp_path.iterdir())  # cleaned at the next save


def test_unreadable_latest_falls_back_with_a_warning(tmp_path):
    save(tmp_path, 1)
    bad = save(tmp_path, 2)
    (bad / ck.MODEL_FILE).write_bytes(b"\x00" * 10)  # truncated by a disk problem
    with pytest.warns(UserWarning, match="step_00000002.*unreadable"):
        latest = ck.load_latest_checkpoint(tmp_path)
    assert latest.meta["step"] == 1
    with pytest.raises(ck.CheckpointError, match="unreadable"):
        ck.load_checkpoint(bad)


def test_resaving_the_same_step_replaces_it(tmp_path):
    save(tmp_path, 5, value=1.0)
    save(tmp_path, 5, value=2.0)
    assert len(ck.list_checkpoints(tmp_path)) == 1
    assert ck.load_latest_checkpoint(tmp_path).model_state["w"][0, 0] == 2.0
