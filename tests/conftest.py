"""Shared test fixtures: paths to the real mini data set and the CPU recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / "shared" / "data" / "imagenette-mini"
CPU_RECIPE = REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml"


@pytest.fixture(scope="session")
def mini_root() -> Path:
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI} (the shared/ folder must sit beside the repository)")
    return MINI
