"""Atomic checkpoints: a kill during a save never leaves the latest one unreadable."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from helpers import REPO

from mae_et import checkpoint as ck
from mae_et.files import try_lock


def save(root, step, value=1.0, keep_last=3):
    return ck.save_checkpoint(
        root, step, {"w": torch.full((2, 2), value)}, {"step": step}, "a: 1\n", {"step": step}, keep_last
    )


def test_round_trip_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, value=step, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    latest = ck.load_latest_checkpoint(tmp_path)
    assert latest.meta["step"] == 4 and latest.training_state["step"] == 4
    assert torch.equal(latest.model_state["w"], torch.full((2, 2), 4.0))


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """A later step already in the folder (one a resume passed over as unreadable) is not counted against the
    steps up to the one just written: keep_last keeps the newest of those, the new one first."""
    save(tmp_path, 10)
    for step in (1, 2, 3):
        assert save(tmp_path, step, keep_last=2).is_dir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000010"]


def test_an_interrupted_save_keeps_the_previous_latest_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("Ctrl-C mid-save")

    monkeypatch.setattr(ck.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # its own temporary folder and lock removed
    assert ck.load_latest_checkpoint(tmp_path).meta["step"] == 1


def test_only_temporary_folders_of_writers_that_are_gone_are_removed(tmp_path):
    """A SIGKILLed save leaves its temporary folder (and maybe its free lock file); a live writer holds its lock.
    The next save removes the first kind only."""
    killed_without_lock = tmp_path / ".tmp-step_00000002-host-11"
    killed_with_lock = tmp_path / ".tmp-step_00000003-host-12"
    live = tmp_path / ".tmp-step_00000004-host-13"
    for folder in (killed_without_lock, killed_with_lock, live):
        folder.mkdir(parents=True)
        (folder / ck.MODEL_FILE).write_bytes(b"half")
    (tmp_path / (killed_with_lock.name + ".lock")).write_text("")
    fd = try_lock(tmp_path / (live.name + ".lock"))  # another open file: flock conflicts as another process would
    try:
        save(tmp_path, 5)
        assert live.is_dir() and not killed_without_lock.exists() and not killed_with_lock.exists()
        assert not (tmp_path / (killed_with_lock.name + ".lock")).exists()
    finally:
        os.close(fd)
    save(tmp_path, 6)  # the writer is gone now
    assert not live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005", "step_00000006"]


def test_weights_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = save(tmp_path, 1)
    finally:
        os.umask(old)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == dict.fromkeys(
        (ck.MODEL_FILE, ck.STATE_FILE, ck.CONFIG_FILE, ck.META_FILE), 0o640
    )


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


KILL_BETWEEN_RENAMES = """
import os, signal, sys, torch
from mae_et import checkpoint as ck
from mae_et.files import try_lock
real_replace = os.replace
def replace_then_die(src, dst):
    real_replace(src, dst)
    if str(dst).endswith(ck.PREV_SUFFIX):  # step_N is now step_N.prev and the new copy not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
ck.os.replace = replace_then_die
ck.save_checkpoint(sys.argv[1], 5, {"w": torch.full((2, 2), 2.0)}, {"step": 5}, "a: 1\\n", {"step": 5}, 3)
"""


@pytest.mark.parametrize("keep_last", [1, 3])
def test_sigkill_while_the_same_step_is_saved_again_loses_nothing(tmp_path, keep_last):
    """A real SIGKILL in the one window of a re-save (old copy moved aside, new one not yet in place)."""
    import subprocess
    import sys

    save(tmp_path, 4, value=0.5, keep_last=keep_last)
    save(tmp_path, 5, value=1.0, keep_last=keep_last)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr  # it died in the window
    assert (tmp_path / ("step_00000005" + ck.PREV_SUFFIX)).is_dir() and not (tmp_path / "step_00000005").exists()
    # step 5 is still there, as it was before the re-save
    assert [p.name[:13] for p in ck.list_checkpoints(tmp_path)][-1] == "step_00000005"
    latest = ck.load_latest_checkpoint(tmp_path)
    assert latest.meta["step"] == 5 and latest.model_state["w"][0, 0] == 1.0
    # the next save puts it back under its own name
    save(tmp_path, 6, value=3.0, keep_last=3)
    assert [p.name for p in ck.list_checkpoints(tmp_path)][-2:] == ["step_00000005", "step_00000006"]
    assert not list(tmp_path.glob("*" + ck.PREV_SUFFIX))


def test_a_resave_in_place_drops_the_replaced_copy(tmp_path):
    save(tmp_path, 5, value=1.0)
    (tmp_path / "step_00000005").rename(tmp_path / ("step_00000005" + ck.PREV_SUFFIX))
    save(tmp_path, 5, value=2.0)  # as after a kill between the renames, then a relaunch saving step 5 again
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    assert ck.load_latest_checkpoint(tmp_path).model_state["w"][0, 0] == 2.0


def test_a_run_folder_means_its_latest_checkpoint_whatever_else_it_holds(tmp_path):
    """A model.safetensors or meta.json beside checkpoints/ (an export written there) never stands in for the run:
    `export RUN` gave such a file's weights instead of the latest checkpoint's."""
    run = tmp_path / "run"
    save(run / "checkpoints", 2)
    latest = save(run / "checkpoints", 4)
    (run / ck.MODEL_FILE).write_bytes(b"an encoder exported here")
    (run / ck.META_FILE).write_text("{}")
    assert ck.resolve_checkpoint(run) == latest
    assert ck.resolve_checkpoint(run / "checkpoints") == latest
    assert ck.resolve_checkpoint(latest / ck.MODEL_FILE) == latest  # a checkpoint's own weights: that checkpoint


LOAD_AS_A_USER = """
import sys, warnings
from mae_et import checkpoint as ck
warnings.simplefilter("error")  # no quiet fall-back to an older checkpoint
try:
    if sys.argv[2] == "latest":
        ck.load_latest_checkpoint(sys.argv[1] + "/checkpoints")
    print(ck.resolve_checkpoint(sys.argv[1]).name)
except ck.CheckpointError as e:
    print(e)
"""


def test_a_checkpoint_this_user_may_not_read_is_said_so_never_skipped_or_called_broken(tmp_path):
    """As a user who is not root: the advice for a broken checkpoint (delete it) would lose a good one, and a
    resume that passed over it would train from an older one; one line saying what cannot be read instead."""
    from helpers import plain_user_prefix

    prefix = plain_user_prefix(tmp_path)
    if prefix is None:
        pytest.skip("cannot run as a user whom file permissions bind (setpriv missing or not allowed)")
    import subprocess
    import sys

    run = tmp_path / "run"
    save(run / "checkpoints", 1)
    latest = save(run / "checkpoints", 2)
    locked = latest / ck.MODEL_FILE
    locked.chmod(0)
    command = [*prefix, sys.executable, "-c", LOAD_AS_A_USER, str(run)]
    try:
        out = subprocess.run([*command, "latest"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.stdout == f"'{locked}' cannot be read (Permission denied); give this user read access\n", out
        locked.chmod(0o644)
        run.chmod(0)
        out = subprocess.run([*command, "resolve"], cwd=REPO, capture_output=True, text=True, timeout=120)
        denied = run / "checkpoints"  # what the OS refused to look at
        assert out.stdout == f"'{denied}' cannot be read (Permission denied); give this user read access\n", out
    finally:
        run.chmod(0o755)
        locked.chmod(0o644)
