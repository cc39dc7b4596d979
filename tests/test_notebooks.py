"""The notebooks run top to bottom on CPU against tiny real runs, and are committed without outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
from helpers import CPU_RECIPE, REPO, in_process_run
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from mae_et.train.config import load_pretrain_config
from mae_et.train.pretrain import pretrain

NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_frequency_curriculum.ipynb", "02_reconstructions.ipynb", "03_compare_runs.ipynb")
CELL_TIMEOUT_S = 120


def train(output_dir: Path, data_root: Path, *overrides: str) -> Path:
    """What `python pretrain.py --config <CPU recipe> data.root=.. output_dir=.. train.epochs=2 ..` does, in-process
    (the interpreter is already warm: much faster than a subprocess on a busy CPU)."""
    with in_process_run():
        cfg = load_pretrain_config(
            CPU_RECIPE, [f"data.root={data_root}", f"output_dir={output_dir}", "train.epochs=2", *overrides]
        )
        return pretrain(cfg).run_dir


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, mini_root) -> dict[str, Path]:
    """An `et` run and a baseline run of 2 epochs each (a few seconds each)."""
    out = tmp_path_factory.mktemp("notebook_runs")
    return {"et": train(out, mini_root), "baseline": train(out, mini_root, "curriculum.schedule=none", "name=baseline")}


@pytest.fixture(scope="session")
def notebook_env(tiny_runs, mini_root) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAE_ET_")}
    env.update(
        MPLBACKEND="Agg",
        MAE_ET_DATA=str(mini_root),
        MAE_ET_CHECKPOINT=str(tiny_runs["et"]),
        MAE_ET_RUNS=os.pathsep.join(str(tiny_runs[k]) for k in ("et", "baseline")),
    )
    return env


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run a copy of the committed notebook in its own folder, as Jupyter would; raises CellExecutionError."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(env=env)
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in outputs(nb) if o.output_type == "stream")


def png_count(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in outputs(nb))


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip outputs before committing"
    # The first code cell reads the inputs, so a user sees at once which variables to set.
    assert "os.environ" in code[0].source


@pytest.mark.parametrize(("name", "min_figures"), zip(NAMES, (4, 2, 1)))
def test_notebook_runs_top_to_bottom(name, min_figures, notebook_env):
    nb = execute(name, notebook_env)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert png_count(nb) >= min_figures


def made_up_study(folder: Path) -> Path:
    """A study results.json in the layout benchmarks/curriculum_vs_baseline.py writes, with made-up numbers."""
    keys = ("wall_s", "cpu_s", "knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1")
    per_seed = {  # run -> one row of keys per seed (seeds 0 and 1)
        "baseline": [(10.0, 19.0, 30.0, 28.0, 35.0, 40.0), (11.0, 20.0, 32.0, 29.0, 36.0, 42.0)],
        "et": [(7.0, 13.0, 31.0, 27.0, 36.0, 41.0), (7.5, 14.0, 33.0, 30.0, 37.0, 41.5)],
        "etpp_half": [(5.0, 9.0, 29.0, 26.0, 34.0, 39.0), (5.2, 9.5, 30.0, 27.0, 35.0, 39.5)],
        "baseline_equal_time": [(7.2, 13.5, 28.0, 26.0, 33.0, 38.0), (7.4, 13.8, 29.0, 27.0, 34.0, 38.5)],
        "untrained": [(0.0, 0.0, 20.0, 18.0, 22.0, 25.0), (0.0, 0.0, 21.0, 19.0, 23.0, 26.0)],
    }
    runs = {
        run: {
            str(seed): {
                "seed": seed,
                "run_dir": f"runs/{run}_seed{seed}",
                "stages": [{"size": 48, "steps": 3}],
                **dict(zip(keys, row)),
            }
            for seed, row in enumerate(rows)
        }
        for run, rows in per_seed.items()
    }
    summary = {
        run: {
            key: {
                "mean": (rows[0][i] + rows[1][i]) / 2,
                "half_range": abs(rows[0][i] - rows[1][i]) / 2,
                "std": abs(rows[0][i] - rows[1][i]) / 2**0.5,
                "values": [rows[0][i], rows[1][i]],
            }
            for i, key in enumerate(keys)
        }
        for run, rows in per_seed.items()
    }
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        json.dumps(
            {
                "study": "made_up",
                "device": "CPU (test)",
                "date": "2025-01-01T00:00:00+00:00",
                "seeds": [0, 1],
                "runs": runs,
                "summary": summary,
            }
        )
    )
    return folder


def test_compare_runs_plots_knn_and_a_study(tmp_path, tiny_runs, notebook_env):
    # kNN accuracy as the engine will log it: extra keys starting with "knn", on lines of their own
    runs = []
    for name, run in tiny_runs.items():
        copy = tmp_path / name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
        last = json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])
        with open(copy / "metrics.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {"step": last["step"], "epoch": last["epoch"], "elapsed_s": last["elapsed_s"], "knn_top1_cls": 12.5}
                )
                + "\n"
            )
        runs.append(str(copy))
    study = made_up_study(tmp_path / "study" / "made_up")
    env = {
        **notebook_env,
        "MAE_ET_RUNS": os.pathsep.join(runs),
        "MAE_ET_STUDY": str(study),
    }  # the folder of results.json
    nb = execute("03_compare_runs.ipynb", env)
    text = printed(nb)
    assert not [o for o in outputs(nb) if o.output_type == "error"]
    assert "no kNN metrics" not in text and "no study results" not in text
    # the study was found through MAE_ET_STUDY and plotted: four runs as points against CPU time, the untrained floor
    assert f"study: {study / 'results.json'}" in text
    assert (
        f"study 'made_up' from {study / 'results.json'}: plotted baseline, et, etpp_half, baseline_equal_time "
        "against cpu_s; floor (dashed): untrained; panels: knn_top1_cls, linear_top1, finetune_top1"
    ) in text, text
    assert png_count(nb) == 3  # the curves, the kNN accuracy, the study


def test_missing_checkpoint_names_the_variable_and_the_command(tmp_path, notebook_env):
    missing = tmp_path / "nowhere"
    with pytest.raises(CellExecutionError) as err:
        execute("02_reconstructions.ipynb", {**notebook_env, "MAE_ET_CHECKPOINT": str(missing)})
    message = str(err.value)
    assert "FileNotFoundError" in message and "MAE_ET_CHECKPOINT" in message
    assert str(missing) in message and "pretrain.py" in message
