"""Shared fixtures: the real mini data set, a tiny pretrained run made once per session, a fresh Accelerate state,
the mini set with broken files planted. The helpers they use (and the tests import directly) are in helpers.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CPU_RECIPE, MINI, ONE_THREAD_ENV, REPO, in_process_run, make_bad_folder, reset_accelerate

from mae_et.checkpoint import list_checkpoints


@pytest.fixture(scope="session")
def mini_root() -> Path:
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI} (the shared/ folder must sit beside the repository)")
    return MINI


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, mini_root) -> Path:
    """Run folder of a real 1-epoch pretraining of the micro CPU recipe, made once per test session."""
    out = tmp_path_factory.getbasetemp() / "micro_pretrain"
    run = out / CPU_RECIPE.stem
    if not list_checkpoints(run / "checkpoints"):
        cmd = [
            sys.executable,
            str(REPO / "pretrain.py"),
            "--config",
            str(CPU_RECIPE),
            f"data.root={mini_root}",
            f"output_dir={out}",
            "train.epochs=1",
        ]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list_checkpoints(run / "checkpoints"), f"pretraining left no checkpoint in {run}"
    return run


@pytest.fixture
def fresh_accelerate():
    """A fresh Accelerate state before and after the test."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture
def one_thread_fresh_accelerate():
    with in_process_run():
        yield


@pytest.fixture
def bad_folder(tmp_path) -> tuple[Path, int]:
    """(an ImageFolder with bad files, how many) -- see make_bad_folder."""
    root = tmp_path / "bad_data"
    return root, make_bad_folder(root)


@pytest.fixture(scope="session")
def pretrained(micro_run) -> Path:
    """The tiny pretrained checkpoint the evaluation tests start from (an alias of micro_run)."""
    return micro_run
