"""Shared fixtures: the real mini data set, a tiny pretrained run made once per session, a fresh Accelerate state,
the mini set with broken files planted. The helpers they use (and the tests import directly) are in helpers.py.
Hooks that keep the suite short (tests/README.md): one intra-op thread, the tests that share a costly run on one
pytest-xdist worker, the longest folders first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import CPU_RECIPE, MINI, in_process_run, make_bad_folder, reset_accelerate

from mae_et.checkpoint import list_checkpoints
from mae_et.train.config import load_pretrain_config
from mae_et.train.pretrain import pretrain

# Fixtures that train or run something for several tests of a file: under -n auto their tests go to one worker
# (an xdist_group each), so that the fixture is made once, not once per worker that meets one of them.
SHARED_RUNS = {
    "study": "smoke_study",  # tests/benchmarks/test_curriculum_vs_baseline.py: the smoke study, two seeds
    "dry": "gpu_check_dry_run",  # tests/benchmarks/test_gpu_check.py
    "straight_run": "straight_run",  # tests/train/test_pretrain.py: the reference of the kill and busy-folder tests
    "two_process_run": "two_process_run",  # tests/train/test_pretrain.py: the reference of shards and Slurm
    "cli_run": "finetune_cli_run",  # tests/evaluate/test_finetune.py
    "tiny_runs": "notebook_runs",  # tests/test_notebooks.py
}


def pytest_configure(config):
    """One intra-op thread in the test processes and in every process they start (unless OMP_NUM_THREADS says
    otherwise): tests run two at a time on a 2-core machine (-n auto), and OpenMP threads spinning against each
    other make the tiny ops of these runs many times slower (see helpers.ONE_THREAD_ENV). Results do not depend on
    it; runs compared with each other all run alike.

    Under -n auto (pytest-xdist's `load` distribution, unless --dist is given), the tests of one SHARED_RUNS group
    go to one worker (`loadgroup`; every other test is distributed as by `load`, the largest groups first)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker with its group")
    if any(arg.startswith("--dist") for arg in config.invocation_params.args):
        return
    if getattr(config.option, "dist", "no") == "load":  # the controller: schedules by group
        config.option.dist = "loadgroup"
    elif hasattr(config, "workerinput"):  # a worker (it parses the command line again): names each test's group
        config.option.loadgroup = True


# Folders whose tests run first: whole training runs and the processes they start, the longest tests, so that under
# -n auto the short ones fill in at the end instead of one long test running on alone.
FIRST = ("train", "benchmarks")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The longest folders first (FIRST); the xdist_group of each test that uses a SHARED_RUNS fixture (before
    xdist reads the marks)."""
    tests = Path(__file__).parent

    def folder_rank(item) -> int:
        folder = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else ""
        return FIRST.index(folder) if folder in FIRST else len(FIRST)

    items.sort(key=folder_rank)  # stable: the collection order within each
    for item in items:
        groups = [SHARED_RUNS[name] for name in getattr(item, "fixturenames", ()) if name in SHARED_RUNS]
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups[0]))


@pytest.fixture(scope="session")
def mini_root() -> Path:
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI} (the shared/ folder must sit beside the repository)")
    return MINI


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, mini_root) -> Path:
    """Run folder of a real 1-epoch pretraining of the micro CPU recipe, made once per test session (in this process:
    a new interpreter would spend longer importing than the run trains)."""
    out = tmp_path_factory.getbasetemp() / "micro_pretrain"
    run = out / CPU_RECIPE.stem
    if not list_checkpoints(run / "checkpoints"):
        cfg = load_pretrain_config(CPU_RECIPE, [f"data.root={mini_root}", f"output_dir={out}", "train.epochs=1"])
        with in_process_run():
            pretrain(cfg)
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
