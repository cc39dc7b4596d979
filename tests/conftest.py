"""Shared test fixtures: paths to the real mini data set and the CPU recipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mae_et.checkpoint import list_checkpoints
from mae_et.train.run import fresh_accelerate_state

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / "shared" / "data" / "imagenette-mini"
CPU_RECIPE = REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml"


def load_benchmark(name: str):
    """benchmarks/<name>.py, imported as the module benchmarks.<name> (the package the scripts import each other
    through)."""
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


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


def reset_accelerate() -> None:
    """Forget this process's Accelerate state: each in-process run builds its own Accelerator (precision and
    tracker may differ), so a test that runs twice in one process resets between the runs."""
    fresh_accelerate_state()


@pytest.fixture
def fresh_accelerate():
    """A fresh Accelerate state before and after the test."""
    reset_accelerate()
    yield
    reset_accelerate()


@contextmanager
def in_process_run():
    """One intra-op thread (see ONE_THREAD_ENV) and a fresh Accelerate state around an in-process run; also
    for module- and session-scoped fixtures, which cannot take the function-scoped fixture below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        yield
    finally:
        reset_accelerate()
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread_fresh_accelerate():
    with in_process_run():
        yield


# ----------------------------------------------------------------------------- the mini set plus broken files


def copy_mini_classes(dst: Path, n_classes: int, n_images: int | None = None) -> list[Path]:
    """The first `n_classes` class folders of imagenette-mini's train split (their first `n_images` JPEGs, or
    all) copied under `dst`; returns the new class folders."""
    out = []
    for cls in sorted(p for p in (MINI / "train").iterdir() if p.is_dir())[:n_classes]:
        (dst / cls.name).mkdir(parents=True)
        for src in sorted(cls.glob("*.JPEG"))[:n_images]:
            shutil.copy(src, dst / cls.name / src.name)
        out.append(dst / cls.name)
    return out


def first_jpeg() -> bytes:
    return sorted((MINI / "train").glob("*/*.JPEG"))[0].read_bytes()


def jpeg_whose_scan_is_broken(real: bytes) -> bytes:
    """A real JPEG's headers up to its frame header (8-bit, 3 components: a header check passes), then a scan
    of garbage: every decoder fails on it."""
    pos = 2
    while real[pos + 1] not in (0xC0, 0xC1, 0xC2):  # walk the marker segments to the frame header
        pos += 2 + ((real[pos + 2] << 8) | real[pos + 3])
    frame_end = pos + 2 + ((real[pos + 2] << 8) | real[pos + 3])
    return real[:frame_end] + b"\xff\xda\x00\x08" + b"\x07" * 300 + b"\xff\xd9"


# Every kind of broken file the tests plant, by name: what it is, and where the pipeline must catch it.
BROKEN_FILES = {
    "zero.JPEG": (lambda real: b"", "empty: skipped at the scan"),
    "notes.txt": (lambda real: b"not an image", "not an image name: skipped at the scan"),
    "truncated.JPEG": (lambda real: real[: len(real) // 3], "a third of a real JPEG: fails to decode"),
    "fake.jpg": (lambda real: b"this is text with an image extension", "text with an image name: fails to decode"),
    "corrupt.JPEG": (
        lambda real: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
        "a JPEG start marker, then noise: fails the header check and decoding",
    ),
    "headers_fine_scan_broken.JPEG": (jpeg_whose_scan_is_broken, "passes the header check, fails to decode"),
}
SKIPPED_AT_SCAN = ("zero.JPEG", "notes.txt")


def write_broken(folder: Path, *names: str) -> list[Path]:
    """Plant the named broken files (keys of BROKEN_FILES) in `folder`."""
    real = first_jpeg()
    paths = []
    for name in names:
        make, _ = BROKEN_FILES[name]
        (folder / name).write_bytes(make(real))
        paths.append(folder / name)
    return paths


def make_bad_folder(dst: Path, undecodable_copies: int = 0) -> int:
    """Four classes of the mini set, with two files skipped at the scan and 2 + `undecodable_copies` that fail
    to decode planted in the first; returns how many bad files it holds."""
    first = copy_mini_classes(dst, 4)[0]
    write_broken(first, "zero.JPEG", "notes.txt", "truncated.JPEG", "fake.jpg")
    for k in range(undecodable_copies):
        (first / f"fake_{k}.jpg").write_text(f"text number {k} with an image extension")
    return 4 + undecodable_copies


@pytest.fixture
def bad_folder(tmp_path) -> tuple[Path, int]:
    """(an ImageFolder with bad files, how many) -- see make_bad_folder."""
    root = tmp_path / "bad_data"
    return root, make_bad_folder(root)


@pytest.fixture(scope="session")
def pretrained(micro_run) -> Path:
    """The tiny pretrained checkpoint the evaluation tests start from (an alias of micro_run)."""
    return micro_run
