"""benchmarks/same_training.py: another checkout that trains a row as this one does is found identical; one whose
training differs (here: the norm-pix epsilon changed in its copy of the model) is found different, exit 1."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from helpers import REPO, load_benchmark

STUDY = REPO / "configs" / "study" / "mini_cpu-smoke.yaml"


@pytest.fixture(scope="module")
def other_checkout(tmp_path_factory):
    """A copy of this checkout's training code and recipes: what a worktree of the same commit holds."""
    other = tmp_path_factory.mktemp("other")
    shutil.copytree(REPO / "mae_et", other / "mae_et", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "configs", other / "configs")
    shutil.copy(REPO / "pretrain.py", other / "pretrain.py")
    return other


def test_the_same_code_trains_the_same_weights(other_checkout, capsys):
    script = load_benchmark("same_training")
    results = script.main(["--study", str(STUDY), "--other", str(other_checkout), "--rows", "et", "--steps", "2"])
    assert results == {"et": None}
    assert "et_seed0: 2 steps, identical weights" in capsys.readouterr().out


def test_a_change_in_training_is_found(other_checkout, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(other_checkout, changed)
    model = changed / "mae_et" / "models" / "mae.py"
    source = model.read_text()
    assert "NORM_PIX_EPS = 1e-6" in source
    model.write_text(source.replace("NORM_PIX_EPS = 1e-6", "NORM_PIX_EPS = 1e-5"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "same_training.py"), "--study", str(STUDY), "--other", str(changed)]
        + ["--rows", "baseline", "--steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "baseline_seed0: 2 steps, DIFFER:" in proc.stdout and "tensors differ" in proc.stdout


def test_a_folder_that_is_no_checkout_is_refused_in_one_line(tmp_path, capsys):
    """In this process, through the script's main() (the test above runs it as its own process)."""
    script = load_benchmark("same_training")
    with pytest.raises(SystemExit) as stopped:
        script.main(["--study", str(STUDY), "--other", str(tmp_path)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --other {tmp_path.resolve()}: no pretrain.py there; give the root of another checkout (a git worktree)"
    ]
