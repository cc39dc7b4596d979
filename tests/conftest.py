"""Shared test fixtures: paths to the real mini data set and the CPU recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from mae_et.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / "shared" / "data" / "imagenette-mini"
CPU_RECIPE = REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml"


def load_benchmark(name: str):
    """A fresh import of benchmarks/<name>.py (not a package), registered under its name: its dataclasses look
    their module up."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def mini_root() -> Path:
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI} (the shared/ folder must sit beside the repository)")
    return MINI


# One intra-op thread for subprocess runs: on a shared 2-core machine OpenMP threads spinning
# against other jobs make the tiny ops of these runs 10-50x slower. Results do not depend on it.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, mini_root) -> Path:
    """Run folder of a real 1-epoch pretraining of the micro CPU recipe, made once per test session."""
    out = tmp_path_factory.getbasetemp() / "micro_pretrain"
    run = out / CPU_RECIPE.stem
    if not list_checkpoints(run / "checkpoints"):
        cmd = [sys.executable, str(REPO / "pretrain.py"), "--config", str(CPU_RECIPE),
               f"data.root={mini_root}", f"output_dir={out}", "train.epochs=1"]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert list_checkpoints(run / "checkpoints"), f"pretraining left no checkpoint in {run}"
    return run


@pytest.fixture
def one_thread_fresh_accelerate():
    """One intra-op thread (see ONE_THREAD_ENV) and a fresh Accelerate state around an in-process run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained(micro_run) -> Path:
    """The tiny pretrained checkpoint the evaluation tests start from (an alias of micro_run)."""
    return micro_run
