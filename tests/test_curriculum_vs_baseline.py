"""The curriculum-vs-baseline study, end to end on the mini data set (the CPU smoke study): four runs x two
seeds pretrained, evaluated, summarised; every number checked against the per-seed values it comes from."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

from conftest import REPO

MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette-mini"
STUDY = REPO / "configs" / "study" / "mini_cpu-smoke.yaml"
RUNS = ("baseline", "et", "etpp_half", "baseline_equal_time")
SEEDS = ("0", "1")
ACCURACY_KEYS = ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1", "finetune_best_top1")


def load_script():
    spec = importlib.util.spec_from_file_location("curriculum_vs_baseline", REPO / "benchmarks" / "curriculum_vs_baseline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["curriculum_vs_baseline"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One real run of the smoke study, in this process (importing torch again would cost more than the runs)."""
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI}")
    out = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: one thread is much faster
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            returned = load_script().main(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--seeds", "0", "1"])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    return saved, out, stdout.getvalue()


def test_every_run_and_seed_has_every_metric_in_range(study):
    result, _, _ = study
    assert set(result["runs"]) == set(RUNS) and result["seeds"] == [0, 1]
    assert result["device"] and result["date"][:4].isdigit() and result["launch"] == "inprocess"
    for run in RUNS:
        assert set(result["runs"][run]) == set(SEEDS), run
        for seed in SEEDS:
            r = result["runs"][run][seed]
            assert r["seed"] == int(seed)
            for key in ACCURACY_KEYS:
                assert 0.0 <= r[key] <= 100.0, (run, seed, key)
            assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
            assert 0 < r["wall_s"] <= r["process_s"]  # the timed loop lies inside the launch
            assert 0 < r["steady_s"] and r["s_per_epoch"] == pytest.approx(r["wall_s"] / (r["steps"] / r["steps_per_epoch"]))
            assert r["images_per_sec"] == pytest.approx(r["steps"] * r["global_batch"] / r["wall_s"])
            assert r["pflop"] > 0 and r["steps_per_epoch"] == 240 // 16
            # time per stage: the logged windows add up to the run's wall time and steps
            assert sum(s["seconds"] for s in r["stages"]) == pytest.approx(r["wall_s"])
            assert sum(s["steps"] for s in r["stages"]) == r["steps"]
            # the run really ran with the study's settings (its saved config)
            cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
            assert cfg["train"]["seed"] == int(seed) and cfg["train"]["epochs"] == pytest.approx(r["epochs"])
            assert cfg["model"]["size"] == "micro" and cfg["data"]["pipeline"] == "memory"
    sizes = {run: [s["size"] for s in result["runs"][run]["0"]["stages"]] for run in RUNS}
    assert sizes["baseline"] == sizes["baseline_equal_time"] == [48]
    assert sizes["et"] == [32, 40, 48] and sizes["etpp_half"] == [24, 32, 40, 48]
    for seed in SEEDS:
        assert result["runs"]["baseline"][seed]["epochs"] == result["runs"]["et"][seed]["epochs"] == 2.0
        assert result["runs"]["etpp_half"][seed]["epochs"] == 1.0  # a compute budget of E/2 ...
        assert result["runs"]["etpp_half"][seed]["steps"] > 15  # ... runs more than E/2 epochs of smaller images


def test_mean_and_spread_are_those_of_the_seeds(study):
    result, _, _ = study
    for run in RUNS:
        for key, stat in result["summary"][run].items():
            values = [result["runs"][run][seed][key] for seed in SEEDS]
            assert stat["values"] == values
            assert stat["mean"] == pytest.approx(sum(values) / 2)
            assert stat["half_range"] == pytest.approx(abs(values[0] - values[1]) / 2)
            assert stat["std"] == pytest.approx(statistics.stdev(values))
    base = result["summary"]["baseline"]["wall_s"]["mean"]
    for run in RUNS:
        assert result["speedups"][run] == pytest.approx(base / result["summary"][run]["wall_s"]["mean"])


def test_equal_time_baseline_gets_et_wall_time_of_its_seed(study):
    result, _, _ = study
    E = 2.0
    for seed in SEEDS:
        et, base = result["runs"]["et"][seed], result["runs"]["baseline"][seed]
        eq, run = result["equal_time"][seed], result["runs"]["baseline_equal_time"][seed]
        assert eq["et_wall_s"] == et["wall_s"] and eq["baseline_wall_s"] == base["wall_s"]
        spe = base["steps_per_epoch"]
        steps = max(1, math.floor(E * et["wall_s"] / base["wall_s"] * spe + 0.5))  # E' rounded to a whole step
        assert eq["steps"] == steps == run["steps"]
        assert eq["epochs"] == pytest.approx(steps / spe) and run["epochs"] == pytest.approx(steps / spe)
        # a full E'-epoch run: its warmup + cosine schedule ends at E', the last lr is near zero
        records = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["progress"] == 1.0 and records[-1]["lr"] < 0.05 * max(r["lr"] for r in records)


def test_table_plot_and_verdicts(study):
    result, out, printed = study
    table = (out / "table.md").read_text()
    for run in RUNS:
        assert f"| {run} |" in table and f"| {run} |" in printed
    assert (out / "accuracy_vs_wall_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdicts = [line for line in printed.splitlines() if line.startswith("verdict ")]
    assert len(verdicts) == 4 and "speed-ups (baseline wall time / run wall time)" in printed
    assert all(any(w in line for w in ("PASS", "FAIL", "n/a")) for line in verdicts)
    v = result["verdicts"]
    assert v["reference"]["verdict"] == "n/a"  # a micro model on a CPU is not the reference's ViT-B on an H100
    assert v["et"]["pass"] == (result["speedups"]["et"] >= 1.5 and all(a["ok"] for a in v["et"]["accuracy"].values()))
    base = result["summary"]["baseline"]
    for key, a in v["etpp_half"]["accuracy"].items():
        assert a["ok"] == (result["summary"]["etpp_half"][key]["mean"] >= base[key]["mean"] - 1.0)
    assert v["equal_time"]["pass"] == (result["summary"]["et"]["linear_top1"]["mean"]
                                       > result["summary"]["baseline_equal_time"]["linear_top1"]["mean"])


def test_subprocess_launch_runs_the_same_config(tmp_path):
    """The GPU launch (`python pretrain.py --config ... overrides`) parses to the config the in-process launch uses."""
    script = load_script()
    from mae_et.cli import parse_args
    from mae_et.config import config_to_dict, load_pretrain_config

    study = script.load_study(STUDY)
    overrides = script.pretrain_overrides(study, "etpp_half", 1, 1.0, MINI, tmp_path)
    cmd = script.pretrain_command(study.recipe, overrides)
    assert Path(cmd[1]) == REPO / "pretrain.py"
    args = parse_args(cmd[2:], "", None)
    cfg = load_pretrain_config(args.config, args.overrides)
    assert config_to_dict(cfg) == config_to_dict(load_pretrain_config(study.recipe, overrides))
    assert (cfg.curriculum.schedule, cfg.curriculum.budget, cfg.train.seed, cfg.train.epochs) == ("etpp", "compute", 1, 1.0)
    assert cfg.data.root == str(MINI) and cfg.tracking.wandb == "off" and not cfg.checkpoint.resume
