"""The entry points from any directory: `python /path/to/pretrain.py` finds its recipe and configs/ wherever it runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

from mae_et import recipes
from mae_et.recipes import ConfigError
from mae_et.train.config import load_pretrain_config


def run_from(cwd, script, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_pretrain_default_recipe_from_another_directory(tmp_path):
    """The default command, launched from a folder that has no configs/: it finds its recipe and trains."""
    proc = run_from(
        tmp_path,
        "pretrain.py",
        f"output_dir={tmp_path / 'runs'}",
        "train.max_steps=1",
        "train.batch_size=8",
        "tracking.wandb=off",
        "tracking.recon_every_epochs=0",
        "tracking.knn_every_epochs=0",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((tmp_path / "runs").glob("*/checkpoints/step_00000001"))


@pytest.mark.parametrize("script", ["finetune/finetune.py", "finetune/linprobe.py"])
def test_eval_entry_points_find_their_default_recipe_from_another_directory(tmp_path, script):
    """Past the recipe, the next thing they need is model.checkpoint: the recipe was found and read."""
    proc = run_from(tmp_path, script)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: model.checkpoint is missing"), proc.stderr


def test_a_relative_recipe_path_is_found_in_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_pretrain_config("configs/pretrain/mae_vit-micro-p8_et_cpu-test.yaml", [f"data.root={tmp_path}"])
    assert cfg.name == "mae_vit-micro-p8_et_cpu-test" and cfg.model.size == "micro"  # its _base_ followed too


def test_a_missing_recipe_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"'configs/pretrain/nope.yaml' does not exist \(here or in .*configs\)"):
        load_pretrain_config("configs/pretrain/nope.yaml")


def test_an_installed_copy_without_recipes_says_where_they_are(tmp_path, monkeypatch):
    """A non-editable install has no configs/ beside the package: the error says so and what to pass."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipes, "SOURCE_ROOT", tmp_path / "site-packages")
    with pytest.raises(ConfigError) as info:
        load_pretrain_config("configs/pretrain/mae_vit-tiny-p8_et_20e_fractal.yaml")
    message = str(info.value)
    assert "no recipes beside it" in message and "configs/ folder of the source checkout" in message
    assert "pip install -e" in message and "\n" not in message
