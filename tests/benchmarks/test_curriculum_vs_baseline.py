"""The curriculum-vs-baseline study: end to end on the mini data set (the CPU smoke study: four runs and the
untrained floor x two seeds, pretrained, evaluated, summarised, every number checked against the per-seed
values it comes from); a study that resumes after a kill; and the verdict arithmetic on made-up summaries."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import MINI, REPO, reset_accelerate

from benchmarks.study.cli import main
from benchmarks.study.clocks import backfill_quiet_cpu, quiet_cpu_seconds, training_clock
from benchmarks.study.config import EQUAL_TIME, RunSpec, StudyError, ablation_seed_plan, load_study, run_targets
from benchmarks.study.evaluation import encoder_at_size
from benchmarks.study.flow import study_options
from benchmarks.study.paths import default_out, in_repo, portable_command
from benchmarks.study.report import replaced_session, report_from_state
from benchmarks.study.runs import (
    clear_if_config_changed,
    equal_time_budget,
    holds_finished_encoder,
    pretrain_command,
    pretrain_overrides,
)
from benchmarks.study.state import ROLE_LOCKS, StudyState
from benchmarks.study.summary import code_note, machines_note, spread
from benchmarks.study.tables import stage_rate_table, stage_rates
from benchmarks.study.verdicts import reference_check, verdict_lines, verdicts

STUDY = REPO / "configs" / "study" / "mini_cpu-smoke.yaml"
RUNS = ("baseline", "et", "etpp_half", "baseline_equal_time")
ROWS = (*RUNS, "untrained")
SEEDS = ("0", "1")
ACCURACY_KEYS = ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1", "finetune_best_top1")


def run_study(argv: list[str]) -> tuple[dict, str]:
    """The study's main() in this process, one thread (tiny ops on a shared 2-core machine), stdout captured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            returned = main(argv)
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    return returned, stdout.getvalue()


def baseline_only(tmp_path: Path, ablations: dict | None = None, **eval_edits: dict) -> Path:
    """The smoke study cut to its baseline (and the untrained row), with these ablations of the baseline and these
    eval sections changed: for the tests of the study's flow (resume, two processes, redone evaluations), which
    need one pretraining run, not four. Written into tmp_path; its recipe paths made absolute."""
    raw = yaml.safe_load(STUDY.read_text())
    raw["pretrain"]["recipe"] = str(STUDY.parent / raw["pretrain"]["recipe"])
    raw["eval"]["finetune"]["recipe"] = str(STUDY.parent / raw["eval"]["finetune"]["recipe"])
    raw["runs"] = {"baseline": raw["runs"]["baseline"]}
    raw["targets"] = {"runs": {}}  # no run to hold to a target
    raw.pop("frontier")
    raw["ablations"] = ablations or {}
    for section, changes in eval_edits.items():
        raw["eval"][section].update(changes)
    path = tmp_path / "baseline_only.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One real run of the smoke study, in this process (importing torch again would cost more than the runs)."""
    if not MINI.is_dir():
        pytest.fail(f"test data missing: {MINI}")
    out = tmp_path_factory.mktemp("study")
    returned, printed = run_study(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--seeds", "0", "1"])
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(returned))
    return saved, out, printed


def test_every_run_and_seed_has_every_metric_in_range(study):
    result, _, _ = study
    assert set(result["runs"]) == set(ROWS) and result["seeds"] == [0, 1]
    assert result["device"] and result["date"][:4].isdigit() and result["launch"] == "inprocess"
    assert result["verdict_clock"] == "wall"
    for run in ROWS:
        assert set(result["runs"][run]) == set(SEEDS), run
        for seed in SEEDS:
            r = result["runs"][run][seed]
            assert r["seed"] == int(seed) and r["machine"]["device"] == result["device"]
            for key in ACCURACY_KEYS:
                assert 0.0 <= r[key] <= 100.0, (run, seed, key)
            # every evaluation stage timed on both clocks
            assert set(r["eval_seconds"]) == {"features_knn", "linear_probe", "finetune", "knn_sizes"}
            # resolution robustness: kNN at every test size of eval.knn.sizes, the training size's being the main kNN
            for pool in ("cls", "mean"):
                assert r[f"knn_top1_{pool}_at48"] == r[f"knn_top1_{pool}"]
                assert all(0.0 <= r[f"knn_top1_{pool}_at{b}"] <= 100.0 for b in (32, 64))
            assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in r["eval_seconds"].values())
    for run in RUNS:
        for seed in SEEDS:
            r = result["runs"][run][seed]
            assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0
            assert 0 < r["wall_s"] <= r["process_s"]  # the timed loop lies inside the launch
            assert r["cpu_s"] > 0 and r["launches"] == 1
            assert 0 < r["steady_s"] and r["s_per_epoch"] == pytest.approx(
                r["wall_s"] / (r["steps"] / r["steps_per_epoch"])
            )
            assert r["images_per_sec"] == pytest.approx(r["steps"] * r["global_batch"] / r["wall_s"])
            assert r["pflop"] > 0 and r["steps_per_epoch"] == 240 // 16
            # time per stage, on both clocks: the logged windows add up to the run's training time and steps
            assert sum(s["seconds"] for s in r["stages"]) == pytest.approx(r["wall_s"])
            assert sum(s["cpu_seconds"] for s in r["stages"]) == pytest.approx(r["cpu_s"])
            assert sum(s["steps"] for s in r["stages"]) == r["steps"]
            # the training clock leaves the checkpoint writes out: the metrics' last record minus its bookkeeping share
            last = json.loads((Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
            assert r["wall_s"] == pytest.approx(last["elapsed_s"] - last["overhead_s"])
            # one checkpoint an epoch (checkpoint_every_epochs: 1) precedes the last record once a run is past its
            # first epoch; an equal-time run of exactly one epoch (the clocks decide) writes its only one after it
            assert (last["overhead_s"] > 0) == (r["steps"] > r["steps_per_epoch"]), (run, seed, r["steps"])
            assert r["cpu_s"] == pytest.approx(last["cpu_s"] - last["overhead_cpu_s"])
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
        untrained = result["runs"]["untrained"][seed]
        assert (untrained["epochs"], untrained["steps"], untrained["wall_s"], untrained["cpu_s"]) == (0.0, 0, 0.0, 0.0)


def test_untrained_row_is_the_baselines_initial_encoder(study):
    """E = 0 is the baseline's step-0 weights: same seed, same model; a different seed gives different weights."""
    from safetensors.torch import load_file

    result, _, _ = study
    from mae_et.checkpoint import MODEL_FILE, list_checkpoints

    weights = {
        seed: load_file(
            str(list_checkpoints(Path(result["runs"]["untrained"][seed]["run_dir"]) / "checkpoints")[-1] / MODEL_FILE)
        )
        for seed in SEEDS
    }
    torch.manual_seed(0)
    from accelerate.utils import set_seed

    from mae_et.models.mae import build_mae
    from mae_et.train.config import load_pretrain_config, mae_spec

    cfg = load_pretrain_config(Path(result["runs"]["baseline"]["0"]["run_dir"]) / "config.yaml", [])
    set_seed(0)
    expected = build_mae(mae_spec(cfg)).state_dict()
    assert all(torch.equal(weights["0"][k], expected[k]) for k in expected)
    assert not torch.equal(weights["0"]["blocks.0.attn.qkv.weight"], weights["1"]["blocks.0.attn.qkv.weight"])


def test_mean_and_spread_are_those_of_the_seeds(study):
    result, _, _ = study
    for run in ROWS:
        for key, stat in result["summary"][run].items():
            values = [result["runs"][run][seed][key] for seed in SEEDS]
            assert stat["values"] == values
            assert stat["mean"] == pytest.approx(sum(values) / 2)
            assert stat["half_range"] == pytest.approx(abs(values[0] - values[1]) / 2)
            assert stat["std"] == pytest.approx(statistics.stdev(values))
    assert "final_loss" not in result["summary"]["untrained"]  # nothing was trained
    for run in RUNS:
        for clock in ("wall", "cpu"):
            # speed-ups are taken within each seed, then averaged
            per_seed = [
                result["runs"]["baseline"][s][f"{clock}_s"] / result["runs"][run][s][f"{clock}_s"] for s in SEEDS
            ]
            assert result["speedups"][run][clock]["values"] == pytest.approx(per_seed)
            assert result["speedups"][run][clock]["mean"] == pytest.approx(sum(per_seed) / 2)


def test_equal_time_baseline_gets_et_time_of_its_seed(study):
    result, _, _ = study
    E = 2.0
    for seed in SEEDS:
        et, base = result["runs"]["et"][seed], result["runs"]["baseline"][seed]
        eq, run = result["equal_time"][seed], result["runs"]["baseline_equal_time"][seed]
        assert eq["clock"] == "wall" and eq["et_s"] == et["wall_s"] and eq["baseline_s"] == base["wall_s"]
        spe = base["steps_per_epoch"]
        # E' = E x time(et) / time(baseline) in whole steps: within half a step of the exact share (the rounding
        # itself: test_equal_time_budget_rounds_half_up_to_a_whole_step)
        assert eq["steps"] == run["steps"] >= 1
        assert abs(run["steps"] - E * et["wall_s"] / base["wall_s"] * spe) <= 0.5
        assert eq["epochs"] == pytest.approx(run["steps"] / spe) and run["epochs"] == pytest.approx(run["steps"] / spe)
        # a full E'-epoch run: its warmup + cosine schedule ends at E', the last lr is near zero
        records = [json.loads(x) for x in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["progress"] == 1.0 and records[-1]["lr"] < 0.05 * max(r["lr"] for r in records)


@pytest.mark.parametrize(
    "epochs, et_s, baseline_s, steps_per_epoch, expected",
    [
        (2.0, 70.0, 100.0, 10, (1.4, 14)),  # 14 steps exactly
        (1.0, 75.0, 100.0, 10, (0.8, 8)),  # 7.5 steps: half up
        (1.0, 74.0, 100.0, 10, (0.7, 7)),  # 7.4 steps: down
        (2.0, 1.0, 1000.0, 10, (0.1, 1)),  # 0.02 steps: never fewer than one
        (3.0, 120.0, 100.0, 5, (3.6, 18)),  # a slower et gives the baseline more than E
    ],
)
def test_equal_time_budget_rounds_half_up_to_a_whole_step(epochs, et_s, baseline_s, steps_per_epoch, expected):
    got_epochs, got_steps = equal_time_budget(epochs, et_s, baseline_s, steps_per_epoch)
    assert (round(got_epochs, 12), got_steps) == expected


def test_table_plot_and_verdicts(study):
    result, out, printed = study
    table = (out / "table.md").read_text()
    for run in ROWS:
        assert f"| {run} |" in table and f"| {run} |" in printed
    assert (out / "accuracy_vs_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed_verdicts = [line for line in printed.splitlines() if line.startswith("verdict ")]
    assert len(printed_verdicts) == 5 and "speed-ups (cpu time, baseline / run, within each seed)" in printed
    assert all(any(w in line for w in ("PASS", "FAIL", "n/a")) for line in printed_verdicts)
    v = result["verdicts"]
    assert v["reference"]["verdict"] == "n/a"  # a micro model on a CPU is not the reference's ViT-B on an H100
    assert set(v["floor"]["runs"]) == set(RUNS)
    # the per-size speed table: every trained image counted once, at its size; the full size is the unit
    rates = result["stage_rates"]
    assert [r["size"] for r in rates] == [24, 32, 40, 48] and rates[-1]["gain"] == pytest.approx(1.0)
    trained = sum(r["steps"] * r["global_batch"] for run in RUNS for r in result["runs"][run].values())
    assert sum(r["images"] for r in rates) == trained
    assert all(r["flop_ratio"] > 1.0 for r in rates[:-1]) and "| decoded share | target | B | GFLOP / image |" in table


def test_a_rerun_reads_everything_back(study):
    """The same command again redoes nothing: every run and evaluation comes back from state.json unchanged."""
    result, out, _ = study
    state_before = (out / "state.json").read_text()
    again, printed = run_study(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--seeds", "0", "1"])
    read_back = [line for line in printed.splitlines() if line.startswith("pretrained ") and "read back" in line]
    assert len(read_back) == len(RUNS) * len(SEEDS) and "evaluated baseline seed 0" in printed
    assert json.loads((out / "state.json").read_text()) == json.loads(state_before)
    for run in ROWS:
        for seed in SEEDS:
            for key in ("wall_s", "cpu_s", *ACCURACY_KEYS):
                assert again["runs"][run][seed][key] == result["runs"][run][seed][key]


def test_a_killed_study_resumes_its_half_finished_run(tmp_path):
    """A pretraining cut off mid-run (as by a session's end) resumes from its checkpoint inside the study, its clock
    carried over, and the study ends with one results.json; nothing finished is redone."""
    from mae_et.train.config import load_pretrain_config
    from mae_et.train.pretrain import pretrain

    path = baseline_only(tmp_path)
    study = load_study(path)
    out = tmp_path / "study"
    overrides = pretrain_overrides(study, "baseline", 0, study.epochs, MINI.resolve(), out)  # the study resolves --data
    # the kill: the baseline stops at step 20 of 30 with a checkpoint (train.max_steps does what a time limit does)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            reset_accelerate()
            pretrain(
                load_pretrain_config(study.recipe, [*overrides, "checkpoint.every_steps=10", "train.max_steps=20"])
            )
    finally:
        torch.set_num_threads(threads)
        reset_accelerate()
    cut = [json.loads(x) for x in (out / "runs" / "baseline_seed0" / "metrics.jsonl").read_text().splitlines()]
    assert cut[-1]["step"] == 20
    # checkpoint.every_steps / max_steps differ from the study's config: the study would start that run over, so
    # write the study's own config in its place (what a run killed under the study leaves)
    from mae_et.recipes import config_to_dict

    (out / "runs" / "baseline_seed0" / "config.yaml").write_text(
        yaml.safe_dump(config_to_dict(load_pretrain_config(study.recipe, overrides)), sort_keys=False)
    )
    result, printed = run_study(["--study", str(path), "--data", str(MINI), "--out", str(out), "--seeds", "0"])
    log = (out / "logs" / "baseline_seed0.pretrain.log").read_text()
    assert "resumed from" in log and "step_00000020" in log
    base = result["runs"]["baseline"]["0"]
    assert base["steps"] == 30
    records = [json.loads(x) for x in (Path(base["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 30 and records[-1]["elapsed_s"] > cut[-1]["elapsed_s"]  # the clock went on
    assert (out / "results.json").is_file() and set(result["runs"]) == {"baseline", "untrained"}


def test_changed_eval_settings_redo_only_the_evaluations(study, tmp_path):
    result, finished, _ = study
    out = tmp_path / "study"
    shutil.copytree(finished, out)  # the module's study stays as it was for the other tests
    path = baseline_only(tmp_path, linprobe={"epochs": 3})  # the baseline's pretraining, settled: read back
    again, printed = run_study(["--study", str(path), "--data", str(MINI), "--out", str(out), "--seeds", "0"])
    read_back = [line for line in printed.splitlines() if line.startswith("pretrained ") and "read back" in line]
    assert read_back == [line for line in read_back if line.startswith("pretrained baseline ")] and read_back
    assert "evaluated baseline seed 0" in printed and "evaluated untrained seed 0" in printed
    assert again["runs"]["baseline"]["0"]["wall_s"] == result["runs"]["baseline"]["0"]["wall_s"]  # not retrained
    assert (Path(again["runs"]["baseline"]["0"]["run_dir"]) / "metrics.jsonl").is_file()


def test_subprocess_launch_runs_the_same_config(tmp_path):
    """The GPU launch (`python pretrain.py --config ... overrides`) parses to the config the in-process launch uses."""
    from mae_et.cli import parse_args
    from mae_et.recipes import config_to_dict
    from mae_et.train.config import load_pretrain_config

    study = load_study(STUDY)
    overrides = pretrain_overrides(study, "etpp_half", 1, 1.0, MINI, tmp_path)
    cmd = pretrain_command(study.recipe, overrides)
    assert Path(cmd[1]) == REPO / "pretrain.py"
    args = parse_args(cmd[2:], "", None)
    cfg = load_pretrain_config(args.config, args.overrides)
    assert config_to_dict(cfg) == config_to_dict(load_pretrain_config(study.recipe, overrides))
    assert (cfg.curriculum.schedule, cfg.curriculum.budget, cfg.train.seed, cfg.train.epochs) == (
        "etpp",
        "compute",
        1,
        1.0,
    )
    assert cfg.data.root == str(MINI) and cfg.tracking.wandb == "off" and cfg.checkpoint.resume


# ----------------------------------------------------------------------------- verdicts on made-up summaries


def made_up(values: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """{run: {key: [per-seed values]}} -> the summary layout (mean / half_range / std / values)."""
    return {run: {key: spread(v) for key, v in keys.items()} for run, keys in values.items()}


def summary_with(
    et_knn: list[float],
    et_time: list[float],
    etpp_knn: list[float],
    etpp_time: list[float],
    eq_linear: float,
    untrained_knn: float = 20.0,
) -> tuple[dict, dict]:
    base = {
        "knn_top1_cls": [50.0, 54.0],
        "knn_top1_mean": [50.0, 54.0],
        "linear_top1": [60.0, 62.0],
        "finetune_top1": [70.0, 70.0],
        "cpu_s": [100.0, 100.0],
        "wall_s": [100.0, 100.0],
    }

    def run(knn, time, linear=(61.0, 61.0)):
        return {
            **base,
            "knn_top1_cls": knn,
            "knn_top1_mean": knn,
            "linear_top1": list(linear),
            "cpu_s": time,
            "wall_s": time,
        }

    values = {
        "baseline": base,
        "et": run(et_knn, et_time),
        "etpp_half": run(etpp_knn, etpp_time),
        "baseline_equal_time": run([50.0, 50.0], et_time, (eq_linear, eq_linear)),
        "untrained": {
            k: [untrained_knn, untrained_knn] for k in ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1")
        },
    }
    summary = made_up(values)
    speedup = {
        run: {clock: spread([100.0 / t for t in values[run][f"{clock}_s"]]) for clock in ("wall", "cpu")}
        for run in RUNS
    }
    return summary, speedup


LEGACY_TARGETS = {
    "et_speedup": 1.4,
    "etpp_speedup": 2.0,
    "etpp_max_drop": 1.0,
    "accuracy_keys": ["knn_top1_cls", "knn_top1_mean", "linear_top1"],
    "min_gain_over_untrained": 5.0,
}


def targets(raw=None):
    """The first edition's target keys, read as the study reads them (`run_targets`)."""
    runs = {name: RunSpec(1.0, []) for name in RUNS}
    return run_targets(raw or LEGACY_TARGETS, runs, Path("study.yaml"))


REFERENCE = {
    "verdict": "n/a",
    "ours_s_per_epoch": 1.0,
    "reference_s_per_epoch": 6.6,
    "differs": ["model tiny vs base"],
    "ratio": None,
}


def test_verdicts_pass_when_every_target_holds():
    # et: 1.5x, kNN 50 and 54 -> mean 52, at the baseline's worst seed (52 - 2 = 50); etpp: 2.5x, 1 point below
    summary, speedup = summary_with([50.0, 54.0], [66.7, 66.7], [51.0, 51.0], [40.0, 40.0], eq_linear=60.0)
    v = verdicts(targets(), "cpu", summary, speedup, REFERENCE, "baseline_equal_time")
    assert v["runs"]["et"]["pass"] and v["runs"]["etpp_half"]["pass"] and v["equal_time"]["pass"] and v["floor"]["pass"]
    lines = verdict_lines(v)
    assert sum("PASS" in line for line in lines) == 4


@pytest.mark.parametrize(
    "case, failing",
    [
        ("et too slow", "et"),
        ("et below the baseline's worst seed", "et"),
        ("etpp too slow", "etpp_half"),
        ("etpp more than a point below", "etpp_half"),
        ("equal time not ahead", "equal_time"),
        ("a trained run near the untrained floor", "floor"),
    ],
)
def test_verdicts_fail_on_each_missed_target(case, failing):
    args = dict(
        et_knn=[50.0, 54.0], et_time=[66.7, 66.7], etpp_knn=[51.0, 51.0], etpp_time=[40.0, 40.0], eq_linear=60.0
    )
    if case == "et too slow":
        args["et_time"] = [75.0, 75.0]  # 1.33x < 1.4x
    elif case == "et below the baseline's worst seed":
        args["et_knn"] = [49.0, 50.9]  # mean 49.95 < 50
    elif case == "etpp too slow":
        args["etpp_time"] = [55.0, 55.0]  # 1.82x
    elif case == "etpp more than a point below":
        args["etpp_knn"] = [50.9, 50.9]  # 1.1 below the baseline's mean 52
    elif case == "equal time not ahead":
        args["eq_linear"] = 61.0  # et's linear is 61: a tie is not ahead
    else:
        args["untrained_knn"] = 46.0  # the equal-time run's kNN 50 < 46 + 5 points
    summary, speedup = summary_with(**args)
    v = verdicts(targets(), "cpu", summary, speedup, REFERENCE, "baseline_equal_time")
    verdict = {
        "et": v["runs"]["et"],
        "etpp_half": v["runs"]["etpp_half"],
        "equal_time": v["equal_time"],
        "floor": v["floor"],
    }
    assert [name for name, x in verdict.items() if not x["pass"]] == [failing]
    line = next(x for x in verdict_lines(v) if "FAIL" in x)
    assert "FAIL" in line


def test_verdicts_use_the_configured_clock():
    summary, speedup = summary_with([50.0, 54.0], [66.7, 66.7], [51.0, 51.0], [40.0, 40.0], eq_linear=60.0)
    speedup["et"]["wall"] = spread([1.2, 1.2])  # a loaded machine: wall time says 1.2x, CPU time 1.5x
    assert verdicts(targets(), "cpu", summary, speedup, REFERENCE, "baseline_equal_time")["runs"]["et"]["pass"]
    assert not verdicts(targets(), "wall", summary, speedup, REFERENCE, "baseline_equal_time")["runs"]["et"]["pass"]


def test_kNN_across_test_sizes_is_tabled(study):
    result, out, _ = study
    table = (out / "table.md").read_text()
    assert "kNN top-1 across test sizes (trained at 48 px" in table and "| 48 px (train) cls | 48 px mean |" in table
    row = next(
        line for line in table.splitlines() if line.startswith("| et |") and "±" in line and line.count("|") == 8
    )
    s = result["summary"]["et"]
    assert f"{s['knn_top1_cls_at32']['mean']:.2f} ± {s['knn_top1_cls_at32']['half_range']:.2f}" in row


@pytest.mark.parametrize("mode", ["grid", "extent"])
def test_encoder_at_another_size_takes_its_pos_embed_mode(study, mode):
    """At a test size other than its training one, the encoder's positions are its MAE's: grid 0..g-1, or extent
    (spread over the training grid); at the training size the stored table."""
    from mae_et.models.mae import get_2d_sincos_pos_embed

    result, _, _ = study
    run_dir = Path(result["runs"]["baseline"]["0"]["run_dir"])
    small = encoder_at_size(run_dir, 32, mode)  # 4 x 4 patches of 8, trained at 6 x 6
    expected = get_2d_sincos_pos_embed(64, 4, extent=6 if mode == "extent" else None)
    assert torch.equal(small.pos_embed[0], expected)
    assert torch.equal(encoder_at_size(run_dir, None, mode).pos_embed[0], get_2d_sincos_pos_embed(64, 6))
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_generic_targets_name_their_runs_and_bounds():
    """The second edition's form: any run, a speed-up, accuracies within the seed range and others within points."""
    runs = {name: RunSpec(1.0, []) for name in ("baseline", "baseline_partial", "et_partial")}
    raw = {
        "runs": {
            "baseline_partial": {
                "speedup": 1.1,
                "within_seed_range": ["knn_top1_cls", "linear_top1"],
                "max_drop": {"finetune_top1": 1.0},
            },
            "et_partial": {"speedup": 1.6, "within_seed_range": ["knn_top1_cls"]},
        },
        "min_gain_over_untrained": 5,
    }
    t = run_targets(raw, runs, Path("s.yaml"))
    base = {
        "knn_top1_cls": [50.0, 54.0],
        "knn_top1_mean": [50.0, 54.0],
        "linear_top1": [60.0, 62.0],
        "finetune_top1": [70.0, 70.0],
        "cpu_s": [100.0, 100.0],
        "wall_s": [100.0, 100.0],
    }
    values = {
        "baseline": base,
        "baseline_partial": {
            **base,
            "knn_top1_cls": [50.0, 50.0],
            "finetune_top1": [69.2, 69.2],
            "cpu_s": [88.0, 90.0],
        },
        "et_partial": {**base, "knn_top1_cls": [49.0, 50.0], "cpu_s": [60.0, 60.0]},
    }
    summary = made_up(values)
    speedup = {r: {c: spread([100.0 / x for x in values[r]["cpu_s"]]) for c in ("wall", "cpu")} for r in values}
    v = verdicts(t, "cpu", summary, speedup, REFERENCE)
    # baseline_partial: 1.125x, kNN 50 = the baseline's worst seed, linear equal, fine-tune 0.8 below (1 allowed)
    assert v["runs"]["baseline_partial"]["pass"]
    assert set(v["runs"]["baseline_partial"]["accuracy"]) == {"knn_top1_cls", "linear_top1", "finetune_top1"}
    # et_partial: 1.67x but kNN mean 49.5 < 50
    assert not v["runs"]["et_partial"]["pass"] and not v["runs"]["et_partial"]["accuracy"]["knn_top1_cls"]["ok"]
    assert "equal_time" not in v
    lines = verdict_lines(v)
    assert lines[0].startswith(
        "verdict baseline_partial (>= 1.1x less cpu time; knn_top1_cls, linear_top1 within the "
        "baseline's seed range or above; finetune_top1 within 1 point): PASS"
    )
    assert "verdict et_partial" in lines[1] and "FAIL" in lines[1]
    with pytest.raises(StudyError, match="targets.runs.et is not a run of this study"):
        run_targets({"runs": {"et": {"speedup": 1.4}}}, runs, Path("s.yaml"))
    with pytest.raises(StudyError, match="accuracies .'top5'. unknown"):
        run_targets({"runs": {"et_partial": {"speedup": 1.4, "max_drop": {"top5": 1}}}}, runs, Path("s.yaml"))


def test_study_runs_come_from_the_config(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "study" / "mini_cpu-smoke.yaml").read_text())
    raw["pretrain"]["recipe"] = str(REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml")
    raw["eval"]["finetune"]["recipe"] = str(REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml")
    raw["runs"] = {
        "baseline": {"budget": 1.0},
        "baseline_partial": {"budget": 1.0, "overrides": {"model.decode_fraction": 0.25}},
    }
    raw["targets"] = {"runs": {"baseline_partial": {"speedup": 1.1}}}
    raw.pop("ablations")
    raw.pop("frontier")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_study(path).run_names == ["baseline", "baseline_partial"]
    for runs, message in [
        ({"plain": {"budget": 1.0}}, "needs one named 'baseline'"),
        ({"baseline": {"budget": 1.0}, "late": {"budget": "equal_time"}}, "there is no run 'et'"),
        ({"baseline": {"budget": 1.0}, "untrained": {"budget": 1.0}}, "study's own rows"),
        ({"baseline": {"budget": 1.0}, "short": {"budget": 0.5, "seeds": [2]}}, "some of the study's seeds"),
        ({"baseline": {"budget": 1.0, "seeds": [0]}}, "the baseline runs on all"),
    ]:
        path.write_text(yaml.safe_dump({**raw, "runs": runs, "targets": {}}))
        with pytest.raises(StudyError, match=message):
            load_study(path)


def test_a_run_with_seeds_of_its_own_is_pretrained_on_those_seeds_only(tmp_path, monkeypatch):
    """A curve-shaping row runs on one seed: the other seed's pretraining neither trains it nor waits for it."""
    from benchmarks.study.flow import StudyRun

    raw = yaml.safe_load(STUDY.read_text())
    raw["runs"]["etpp_half"]["seeds"] = [0]
    raw["pretrain"]["recipe"] = str(REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml")
    raw["eval"]["finetune"]["recipe"] = str(REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = load_study(path)
    assert study.runs["etpp_half"].seeds == [0] and study.runs["et"].seeds is None
    trained = []
    monkeypatch.setattr(StudyRun, "pretrain_row", lambda self, row, seed, epochs: trained.append((row, seed)) or True)
    monkeypatch.setattr(StudyRun, "equal_time_epochs", lambda self, seed: 1.0)
    options = study_options(study, [0, 1], [], [], part="pretrain")
    run = StudyRun(study, MINI, tmp_path / "out", StudyState(tmp_path / "state.json"), options, 48)
    run.run()
    assert [r for r, s in trained if s == 0] == list(RUNS)
    assert [r for r, s in trained if s == 1] == ["baseline", "et", "baseline_equal_time"]


def test_reference_check_passes_and_fails_only_when_everything_matches():
    study = load_study(REPO / "configs" / "study" / "imagenette_vit-s16_200e.yaml")
    ref = study.reference

    class Cfg:  # the reference's own settings
        class model:
            size, patch_size, decoder_embed_dim, decoder_depth = (
                ref["model"],
                ref["patch_size"],
                ref["decoder_embed_dim"],
                ref["decoder_depth"],
            )

        class train:
            batch_size, accum_steps = ref["batch_size"], 1

        class data:
            crop_size = ref["crop_size"]

    assert reference_check(study, Cfg, "NVIDIA H100 80GB HBM3", 6.0)["verdict"] == "PASS"
    assert reference_check(study, Cfg, "NVIDIA H100 80GB HBM3", 7.0)["verdict"] == "FAIL"
    other = reference_check(study, Cfg, "NVIDIA H200", 6.0)
    assert other["verdict"] == "n/a" and any("device" in d for d in other["differs"])


def test_machines_note_names_mixed_machines():
    m1, m2 = {"device": "CPU (A, 2 cores)", "host": "h1"}, {"device": "CPU (B, 2 cores)", "host": "h2"}
    same = {"baseline": {"0": {"machine": m1}, "1": {"machine": m1}}}
    assert machines_note(same)["notes"] == []
    across = {"baseline": {"0": {"machine": m1}, "1": {"machine": m2}}}
    assert "the seeds ran on different machines" in machines_note(across)["notes"][0]
    within = {"baseline": {"0": {"machine": m1}}, "et": {"0": {"machine": m2}}}
    assert "seed 0's runs ran on 2 machines" in machines_note(within)["notes"][0]


def test_ablation_rows_run_after_the_main_rows_against_the_same_baseline(study, tmp_path):
    """--ablations adds rows '<run>+<name>': pretrained with the ablation's settings, evaluated the same way, their
    speed-up taken against the same seed's baseline; the main rows are read back, not redone. --ablation-seeds
    gives them fewer seeds than the study, and each is compared with its run on those seeds only."""
    result, finished, _ = study
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    again, printed = run_study(
        [
            "--study",
            str(STUDY),
            "--data",
            str(MINI),
            "--out",
            str(out),
            "--seeds",
            "0",
            "1",
            "--ablations",
            "floor32",
            "warmup20",
            "--ablation-seeds",
            "0",
        ]
    )
    read_back = [line for line in printed.splitlines() if line.startswith("pretrained ") and "read back" in line]
    assert len(read_back) == 2 * len(RUNS)
    rows = {"etpp_half+floor32", "etpp_half+warmup20"}
    assert rows <= set(again["runs"]) and rows <= set(again["summary"]) and rows <= set(again["speedups"])
    assert all(set(again["runs"][row]) == {"0"} for row in rows) and again["ablation_seeds"] == {
        "floor32": [0],
        "warmup20": [0],
    }
    # beside its run on seed 0 only (the run's two-seed mean would mix in a seed the ablation never had)
    for row in rows:
        effect, abl, run = again["ablations"][row], again["runs"][row]["0"], again["runs"]["etpp_half"]["0"]
        assert effect["run"] == "etpp_half" and effect["seeds"] == [0]
        for key in ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1"):
            assert effect["minus_run"][key]["values"] == [pytest.approx(abl[key] - run[key])]
        assert effect["time_ratio"]["cpu"]["values"] == [pytest.approx(run["cpu_s"] / abl["cpu_s"])]
        assert effect["flop_ratio"]["values"] == [pytest.approx(run["pflop"] / abl["pflop"])]
    # warmup20 changes no shape: the same plan; floor32 trades 24-px steps for fewer 32-px ones in the same budget
    assert again["ablations"]["etpp_half+warmup20"]["flop_ratio"]["mean"] == pytest.approx(1.0)
    assert again["ablations"]["etpp_half+floor32"]["flop_ratio"]["mean"] != pytest.approx(1.0, abs=1e-3)
    table = (out / "table.md").read_text()
    main_table, _, ablations = table.partition("ablations: ")
    assert "| etpp_half+floor32 |" not in main_table and "| etpp_half+floor32 | 0 |" in ablations
    floor_knn = again["runs"]["etpp_half+floor32"]["0"]["knn_top1_cls"]
    delta = again["ablations"]["etpp_half+floor32"]["minus_run"]["knn_top1_cls"]["mean"]
    assert f"| {floor_knn:.2f} ({delta:+.2f}) |" in ablations
    # every run records the commit that trained it; one commit here, so no note
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert again["runs"]["etpp_half+floor32"]["0"]["code"]["commit"] == head
    assert again["code"]["notes"] == []
    floor = again["runs"]["etpp_half+floor32"]["0"]
    assert [s["size"] for s in floor["stages"]] == [32, 40, 48]  # 24 lifted to 32
    cfg = yaml.safe_load((Path(floor["run_dir"]) / "config.yaml").read_text())
    assert cfg["curriculum"]["min_size"] == 32 and cfg["curriculum"]["schedule"] == "etpp"
    warm = yaml.safe_load((Path(again["runs"]["etpp_half+warmup20"]["0"]["run_dir"]) / "config.yaml").read_text())
    assert warm["optim"]["warmup_epochs"] == pytest.approx(0.2 * 1.0)  # 20% of its E/2 = 1 epoch budget
    base = again["runs"]["baseline"]["0"]
    assert again["speedups"]["etpp_half+floor32"]["cpu"]["values"] == [pytest.approx(base["cpu_s"] / floor["cpu_s"])]
    for key in ("knn_top1_cls", "linear_top1", "finetune_top1"):
        assert 0.0 <= floor[key] <= 100.0
    assert "| etpp_half+floor32 |" in (out / "table.md").read_text()
    with pytest.raises(StudyError, match="ablations \\['nope'\\] are not in"):
        main(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--ablations", "nope"])
    with pytest.raises(StudyError, match="--ablation-seeds \\[2\\] are not among --seeds"):
        main(
            [
                "--study",
                str(STUDY),
                "--data",
                str(MINI),
                "--out",
                str(out),
                "--seeds",
                "0",
                "1",
                "--ablations",
                "floor32",
                "--ablation-seeds",
                "2",
            ]
        )


def test_ablation_seeds_for_all_or_per_ablation():
    plan = ablation_seed_plan
    names, seeds = ["pos_extent", "warmup20", "floor32"], [0, 1]
    assert plan([], names, seeds) == {n: [0, 1] for n in names}
    assert plan(["0"], names, seeds) == {n: [0] for n in names}
    assert plan(["pos_extent=0,1", "0"], names, seeds) == {"pos_extent": [0, 1], "warmup20": [0], "floor32": [0]}
    assert plan(["warmup20=1"], names, seeds) == {"pos_extent": [0, 1], "warmup20": [1], "floor32": [0, 1]}
    error = StudyError
    with pytest.raises(error, match="'nope' is not among --ablations"):
        plan(["nope=0"], names, seeds)
    with pytest.raises(error, match="give seeds"):
        plan(["warmup20=a"], names, seeds)
    with pytest.raises(error, match="\\[2\\] are not among --seeds"):
        plan(["floor32=0,2"], names, seeds)


def test_code_note_names_mixed_commits():
    results = {
        "baseline": {
            "0": {"code": {"commit": "a" * 40, "dirty": False}},
            "1": {"code": {"commit": "b" * 40, "dirty": True}},
        },
        "et": {"0": {"code": {"commit": "a" * 40, "dirty": False}}, "1": {}},
    }  # seed 1: before it was recorded
    note = code_note(results)
    assert note["by_commit"] == {
        "aaaaaaaaaa": ["baseline_seed0", "et_seed0"],
        "bbbbbbbbbb with changes": ["baseline_seed1"],
    }
    assert note["notes"] == [
        "the runs were trained by 2 code versions (aaaaaaaaaa: baseline_seed0, et_seed0; "
        "bbbbbbbbbb with changes: baseline_seed1)"
    ]
    assert code_note({"baseline": {"0": results["baseline"]["0"]}, "et": {"0": results["et"]["0"]}})["notes"] == []


def start_eval_only(out: Path, *more: str, study: Path = STUDY) -> subprocess.Popen:
    """The study's --eval-only part for seed 0 in its own process, polling every second."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "curriculum_vs_baseline.py"), "--study", str(study)]
    cmd += ["--data", str(MINI), "--out", str(out), "--seeds", "0", "--eval-only", "--poll-seconds", "1", *more]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def lines_until_waiting(evaluator: subprocess.Popen) -> list[str]:
    """The evaluator's lines up to its first wait for the other process (or its end); at least one."""
    seen = []
    for line in evaluator.stdout:
        seen.append(line)
        if "waiting for" in line:
            break
    assert seen, "the --eval-only process printed nothing"
    return seen


def test_evaluation_beside_pretraining_in_two_processes(tmp_path):
    """--eval-only (its own process, started first) waits for the runs that --pretrain-only trains, evaluates each
    as it lands in the shared state.json, and writes the one results.json; nothing is trained twice. (The study cut
    to its baseline and one ablation of it: two runs to wait for.)"""
    path = baseline_only(tmp_path, ablations={"warmup20": {"runs": ["baseline"], "warmup_fraction": 0.2}})
    out = tmp_path / "study"
    evaluator = start_eval_only(out, "--ablations", "warmup20", study=path)
    try:
        seen = lines_until_waiting(evaluator)  # it found nothing pretrained yet
        assert "waiting for baseline" in seen[-1], "".join(seen)[-3000:]
        returned, printed = run_study(
            ["--study", str(path), "--data", str(MINI), "--out", str(out), "--seeds", "0", "--pretrain-only"]
            + ["--ablations", "warmup20"]
        )
        log, _ = evaluator.communicate(timeout=600)
    finally:
        evaluator.kill()
    assert evaluator.returncode == 0, log[-3000:]
    assert "pretraining done for seeds [0]" in printed and "summary" not in returned
    assert "evaluated untrained seed 0" in "".join(seen) and "evaluated baseline seed 0" in log
    # the ablation rows are split the same way: trained by one process, evaluated by the other, none twice
    assert "pretrained baseline+warmup20 seed 0" in printed and "evaluated" not in printed
    assert "evaluated baseline+warmup20 seed 0" in log
    result = json.loads((out / "results.json").read_text())
    assert set(result["runs"]) == {"baseline", "untrained", "baseline+warmup20"}
    state = json.loads((out / "state.json").read_text())
    assert all(state["launches"][f"{run}_seed0"] == 1 for run in ("baseline", "baseline+warmup20"))  # trained once
    assert result["runs"]["baseline"]["0"]["wall_s"] == state["runs"]["baseline"]["0"]["pretrain"]["value"]["wall_s"]


def test_evaluated_runs_read_back_without_their_folders(study, tmp_path):
    """A new checkout has the (published) state.json but none of the run folders: every run that was already
    evaluated is read back, nothing is retrained; the report is the same."""
    result, finished, _ = study
    out = tmp_path / "study"
    out.mkdir()
    state = json.loads((finished / "state.json").read_text())  # what --publish commits ...
    for per_seed in state["runs"].values():
        for entry in per_seed.values():  # ... on a machine where the run folders are gone
            entry["pretrain"]["value"]["run_dir"] = str(
                tmp_path / "gone" / Path(entry["pretrain"]["value"]["run_dir"]).name
            )
    (out / "state.json").write_text(json.dumps(state))
    again, printed = run_study(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--seeds", "0", "1"])
    read_back = [line for line in printed.splitlines() if line.startswith("pretrained ") and "read back" in line]
    assert len(read_back) == len(RUNS) * len(SEEDS)
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())  # nothing trained, no untrained saved
    for run in ROWS:
        for seed in SEEDS:
            assert again["runs"][run][seed]["linear_top1"] == result["runs"][run][seed]["linear_top1"]


def test_eval_only_waits_for_a_run_whose_encoder_is_not_on_this_machine(study, tmp_path):
    """A state carried to a new machine may hold a run pretrained but not evaluated there: its checkpoints are gone,
    and the pretraining process trains it again into a folder that holds only config.yaml and metrics.jsonl, then
    earlier checkpoints. --eval-only waits for that run (it once tried to load the half-made folder and crashed)."""
    _, finished, _ = study
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    state = json.loads((out / "state.json").read_text())
    record = state["runs"]["et"]["0"]
    del record["eval"]  # pretrained, not evaluated
    run_dir = out / "runs" / "et_seed0"
    record["pretrain"]["value"]["run_dir"] = str(run_dir)
    (out / "state.json").write_text(json.dumps(state))
    steps = record["pretrain"]["value"]["steps"]
    assert holds_finished_encoder(run_dir, steps)
    shutil.rmtree(sorted((run_dir / "checkpoints").iterdir())[-1])  # as a relaunched retraining leaves it
    assert not holds_finished_encoder(run_dir, steps) and not holds_finished_encoder(tmp_path / "gone", 0)
    evaluator = start_eval_only(out)
    try:
        seen = lines_until_waiting(evaluator)
        said = "".join(seen)
        assert "seed 0: waiting for et, baseline_equal_time to be pretrained" in seen[-1], said[-3000:]
        assert evaluator.poll() is None  # still waiting, not crashed
        assert "evaluated et seed 0" not in said and "pretrained et seed 0" not in said
    finally:
        evaluator.kill()
        evaluator.wait()


def test_a_run_folder_of_other_settings_is_moved_aside_not_deleted(tmp_path, capsys):
    """The same data under another path (a symlink resolved, another checkout) changes a run's settings: the study
    starts that run over, but keeps the old folder (it may hold a finished run's only checkpoint) and says why."""
    from mae_et.recipes import config_to_dict
    from mae_et.train.config import load_pretrain_config

    cfg = load_pretrain_config(
        load_study(STUDY).recipe, [f"data.root={MINI}", f"output_dir={tmp_path}", "name=baseline_seed0"]
    )
    run_dir = cfg.run_dir
    (run_dir / "checkpoints" / "step_00000030").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000030" / "meta.json").write_text('{"complete": true}')
    old = config_to_dict(cfg)
    old["data"]["root"] = "/elsewhere/imagenette"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    aside = clear_if_config_changed(run_dir, cfg)
    assert aside == run_dir.with_name("baseline_seed0.old-1") and not run_dir.exists()
    assert (aside / "checkpoints" / "step_00000030" / "meta.json").is_file()  # nothing lost
    said = capsys.readouterr().out
    assert "data.root ('/elsewhere/imagenette' -> " in said and "kept as baseline_seed0.old-1" in said
    # the same settings: left where it is
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    assert clear_if_config_changed(run_dir, cfg) is None and run_dir.is_dir()


def test_report_only_rewrites_the_same_report_and_trains_nothing(study, tmp_path):
    """--report-only writes results.json and table.md again from state.json and the study config: the same bytes
    as the session that trained and evaluated (its date, device, torch and launch kept from the results.json it
    replaces; the recorded commands name the folder the copy is in), with the run and fine-tune folders gone, and
    none made again: nothing was trained or evaluated; a row missing from the state stops it with one line."""
    _, finished, _ = study
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "runs")  # the pretraining and fine-tune folders: a run trained or evaluated again shows here
    shutil.rmtree(out / "eval")
    before = {name: (finished / name).read_bytes() for name in ("results.json", "table.md", "state.json")}
    # the recorded commands name the study folder the runs go to (the copy's); the records name where they went
    before["results.json"] = before["results.json"].replace(
        f'output_dir=\\"{finished}/'.encode(), f'output_dir=\\"{out}/'.encode()
    )
    argv = ["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--seeds", "0", "1", "--report-only"]
    run_study(argv)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not any((out / "runs").iterdir()) and not any((out / "eval").iterdir())  # nothing trained or fine-tuned
    state = json.loads(before["state.json"])
    del state["runs"]["et"]["1"]["eval"]
    (out / "state.json").write_text(json.dumps(state))
    with pytest.raises(StudyError, match="--report-only: et seed 1 has no evaluation in"):
        main(argv)


def test_the_report_of_a_study_with_a_frontier_has_its_table_and_plot(study):
    """The smoke study's rows as two families (plain MAE at its two budgets, the curricula): the report has the
    frontier's points (CPU time and accuracies from the summary), its comparisons, table and plot."""
    result, out, _ = study
    f = result["frontier"]
    assert [p["run"] for p in f["points"] if p["family"] == "plain"] == sorted(
        ["baseline", "baseline_equal_time"], key=lambda r: result["summary"][r]["cpu_s"]["mean"]
    )
    assert {p["run"] for p in f["points"]} == {"baseline", "baseline_equal_time", "etpp_half", "et"}
    for p in f["points"]:
        s = result["summary"][p["run"]]
        assert p["cpu_s"] == s["cpu_s"]["mean"] and p["accuracy"]["linear_top1"] == s["linear_top1"]
    assert f["clock"] == "recorded CPU" and all(c["against"] != c["family"] for c in f["comparisons"])
    assert "frontier: accuracy against pretraining CPU time" in (out / "table.md").read_text()
    at_parity = f["at_parity"]  # the config's parity: every point but the baseline, seed by seed
    assert [r["run"] for r in at_parity["points"]] == sorted(
        ["baseline_equal_time", "etpp_half", "et"], key=lambda r: result["summary"][r]["cpu_s"]["mean"]
    )
    assert at_parity["bounds"]["knn_top1_cls"] == min(result["summary"]["baseline"]["knn_top1_cls"]["values"])
    assert "cheapest at parity on every seed: " in (out / "table.md").read_text()
    assert (out / "frontier.png").stat().st_size > 10_000


RESULTS = REPO / "benchmarks" / "results"
# (edition, the published command's --seeds / --ablations / --ablation-seeds)
PUBLISHED = [
    ("imagenette_vit-t8_64px_20e_cpu", [0, 1], ["all"], ["pos_extent=0,1", "0"]),
    ("imagenette_vit-t8_64px_20e_frontier_cpu", None, [], []),
]


@pytest.mark.parametrize(("edition", "seeds", "ablations", "ablation_seeds"), PUBLISHED)
def test_the_published_report_regenerates_byte_identical_from_the_published_state(
    tmp_path, edition, seeds, ablations, ablation_seeds
):
    """A published edition's results.json and table.md, rebuilt into tmp_path from its published state.json and its
    study config by the report-only path (nothing trained or evaluated, no data read), are byte for byte the
    published files. What state.json does not hold (date, device, torch, launch, image count, warm-up) comes from
    the published results.json, as --report-only takes it; the rows are those of the published command; its runs'
    folder is the study's default one, which the recorded commands name (nothing is read or written there). The
    frontier edition also reads its step costs (the x axis, the verdicts' speed-ups) and its parity."""
    published = RESULTS / edition
    study = load_study(REPO / "configs" / "study" / f"{edition}.yaml")
    state_bytes = (published / "state.json").read_bytes()
    records = [e["pretrain"]["value"] for seeds_ in json.loads(state_bytes)["runs"].values() for e in seeds_.values()]
    here = [
        r["run_dir"] for r in records if "quiet_cpu_s" not in r and (in_repo(r["run_dir"]) / "metrics.jsonl").exists()
    ]
    if here:  # the report rightly differs then: it backfills the quiet-CPU clock from them
        pytest.skip(f"run folders of {edition} are in this checkout ({here[0]}, ...)")
    options = study_options(study, seeds, ablations, ablation_seeds)
    session = replaced_session(tmp_path, published)  # tmp_path has no results.json: the published one's
    state = StudyState(published / "state.json")
    report_from_state(study, state, options, session, study.data_root, default_out(study.name), tmp_path)
    for name in ("results.json", "table.md"):
        assert (tmp_path / name).read_bytes() == (published / name).read_bytes(), name
    assert (published / "state.json").read_bytes() == state_bytes and not (tmp_path / "state.json").exists()


def test_the_frontier_editions_verdicts_take_the_step_costs_and_name_the_cheapest_at_parity():
    """The published frontier edition: its verdicts' speed-ups are the step costs' (one idle session side by side),
    not the rows' own clocks from several sessions, and its parity table names etpp + extent at half the budget."""
    result = json.loads((RESULTS / "imagenette_vit-t8_64px_20e_frontier_cpu" / "results.json").read_text())
    points = {p["run"]: p for p in result["frontier"]["points"]}
    for row, verdict in result["verdicts"]["runs"].items():
        assert verdict["speedup"] == points[row]["speedup"] != result["speedups"][row]["cpu"]["mean"]
    assert result["frontier"]["at_parity"]["cheapest"] == "etpp_x_b050"
    assert round(points["etpp_x_b050"]["speedup"], 2) == 1.94


def test_recheck_reproduces_a_stored_evaluation_and_changes_nothing(study, tmp_path):
    """--recheck ROW:SEED evaluates a finished encoder again beside its stored numbers: with the same code on the
    same machine every number comes back exactly; state.json is untouched; a row without an evaluation is refused."""
    _, finished, _ = study
    out = tmp_path / "study"
    shutil.copytree(finished, out)
    before = (out / "state.json").read_text()
    report, printed = run_study(
        ["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--recheck", "etpp_half:1"]
    )
    again = report["etpp_half_seed1"]
    stored = json.loads(before)["runs"]["etpp_half"]["1"]["eval"]["value"]
    assert again["stored"] == stored and set(again["difference"]) == {*ACCURACY_KEYS}
    assert all(again["difference"][k] == 0.0 for k in ACCURACY_KEYS), again["difference"]
    assert (out / "recheck" / "eval" / "etpp_half_seed1_finetune").is_dir()  # not the stored fine-tune's folder
    assert json.loads((out / "recheck" / "recheck.json").read_text()) == json.loads(json.dumps(report))
    assert "recheck etpp_half_seed1: knn_top1_cls" in printed and (out / "state.json").read_text() == before
    with pytest.raises(StudyError, match="no evaluated run 'et' seed '7'"):
        main(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--recheck", "et:7"])


def test_a_study_role_is_one_process_at_a_time_and_out_is_checked_first(tmp_path):
    """Two study processes doing the same part on one --out (two --pretrain-only launches) would train each run
    twice into the same folders: the second stops in one line before any work. --out may not lie in the data."""
    from mae_et.files import RunFolderLock

    out = tmp_path / "study"
    out.mkdir()
    with RunFolderLock(out, lock_name=ROLE_LOCKS["pretrain"]):  # another process pretraining this study
        with pytest.raises(
            StudyError,
            match=r"study folder \(pretrain\) '.*' is in use by another run \(pid "
            rf"{os.getpid()} on host",
        ):
            main(["--study", str(STUDY), "--data", str(MINI), "--out", str(out), "--seeds", "0", "--pretrain-only"])
    assert sorted(p.name for p in out.iterdir()) == [".pretrain.lock"]  # nothing was started
    with pytest.raises(StudyError, match="--out '.*' overlaps '.*', which this command reads"):
        main(["--study", str(STUDY), "--data", str(MINI), "--out", str(MINI / "val" / "study"), "--seeds", "0"])
    assert not (MINI / "val" / "study").exists()


def test_a_run_folder_in_use_is_never_moved_aside(tmp_path):
    from mae_et.files import RunFolderBusy, RunFolderLock
    from mae_et.recipes import config_to_dict
    from mae_et.train.config import load_pretrain_config

    cfg = load_pretrain_config(
        load_study(STUDY).recipe, [f"data.root={MINI}", f"output_dir={tmp_path}", "name=baseline_seed0"]
    )
    cfg.run_dir.mkdir(parents=True)
    old = config_to_dict(cfg)
    old["train"]["seed"] = 7
    (cfg.run_dir / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    with RunFolderLock(cfg.run_dir):  # a live run is writing there
        with pytest.raises(RunFolderBusy, match="is in use by another run"):
            clear_if_config_changed(cfg.run_dir, cfg)
    assert cfg.run_dir.is_dir() and not cfg.run_dir.with_name("baseline_seed0.old-1").exists()


def test_recorded_commands_and_run_folders_are_relative_to_the_checkout():
    command = portable_command(
        [
            sys.executable,
            str(REPO / "pretrain.py"),
            "--config",
            str(REPO / "configs" / "study" / ".." / "pretrain" / "x.yaml"),
            f"data.root={json.dumps(str(REPO / '.data' / 'imagenette'))}",
            f"output_dir={REPO / 'runs' / 'study'}",
            "train.seed=0",
            "data.root=/data/elsewhere",
        ]
    )
    assert command == [
        "python",
        "pretrain.py",
        "--config",
        "configs/pretrain/x.yaml",
        'data.root=".data/imagenette"',
        "output_dir=runs/study",
        "train.seed=0",
        "data.root=/data/elsewhere",
    ]
    assert in_repo("runs/study/x") == REPO / "runs" / "study" / "x" and in_repo("/abs/x") == Path("/abs/x")


def test_published_results_name_no_machine_paths():
    """What --publish committed reads the same on any checkout: no interpreter or checkout path in it."""
    found = []

    def walk(x, where):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, str) and (
            str(REPO) in x or x.startswith(("/root/", "/home/", "/usr/")) or "/bin/python" in x
        ):
            found.append(f"{where}: {x}")

    files = sorted((REPO / "benchmarks" / "results").glob("*/*.json"))
    assert files
    for path in files:
        walk(json.loads(path.read_text()), path.relative_to(REPO))
    assert not found, found[:5]


def test_stage_rates_keep_each_share_and_target_apart():
    """Rows that decode a share of the patches, or predict HOG, are rated against their own full size, with their own
    FLOPs (decoder tokens, head width); the records of the first edition (neither key) count as every patch, pixels."""
    from mae_et.models.flops import mae_train_flops_per_image
    from mae_et.train.config import load_pretrain_config

    cfg = load_pretrain_config(
        REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml", ["data.source=fractal"]
    )

    def record(stages, **kind):
        return {
            "global_batch": 10,
            "stages": [{"size": b, "steps": n, "cpu_seconds": sec, "seconds": sec} for b, n, sec in stages],
            **kind,
        }

    results = {
        "baseline": {"0": record([(48, 10, 20.0)])},  # a first-edition record
        "et": {"0": record([(32, 10, 5.0), (48, 10, 20.0)], decode_fraction=1.0, target="pixel")},
        "et_partial": {"0": record([(32, 10, 4.0), (48, 10, 10.0)], decode_fraction=0.25, target="pixel")},
        "et_hog": {"0": record([(32, 10, 2.0), (48, 10, 8.0)], decode_fraction=1.0, target="hog")},
        "et_partial_full": {
            "0": record(
                [(32, 10, 3.0), (48, 10, 10.0)], decode_fraction=0.25, decode_fraction_of="full_size", target="pixel"
            )
        },
    }
    listed = stage_rates(results, cfg, "cpu")
    of_full = {r["size"]: r for r in listed if r.get("decode_fraction_of") == "full_size"}
    rates = {(r["decode_fraction"], r["target"], r["size"]): r for r in listed if r not in of_full.values()}
    assert set(rates) == {
        (1.0, "pixel", 32),
        (1.0, "pixel", 48),
        (1.0, "hog", 32),
        (1.0, "hog", 48),
        (0.25, "pixel", 32),
        (0.25, "pixel", 48),
    }
    assert rates[(1.0, "pixel", 48)]["images"] == 200 and rates[(1.0, "pixel", 48)]["seconds"] == 40.0
    assert rates[(1.0, "hog", 32)]["gain"] == pytest.approx((100 / 2.0) / (100 / 8.0))
    m = cfg.model

    def flops(b, **kw):
        return mae_train_flops_per_image(
            m.size, b, m.patch_size, m.decoder_embed_dim, m.decoder_depth, m.mask_ratio, **kw
        )

    assert rates[(1.0, "hog", 32)]["flop_ratio"] == pytest.approx(flops(48, target="hog") / flops(32, target="hog"))
    assert rates[(0.25, "pixel", 32)]["gflop_per_image"] == pytest.approx(flops(32, decode_fraction=0.25) / 1e9)
    assert flops(48, target="hog") < flops(48)
    table = stage_rate_table(list(rates.values()), "cpu")
    assert "| 1 | hog | 32 |" in table and "| 0.25 | pixel | 48 |" in table
    # a share of the full size's patches is its own kind: at 32 px it decodes more than the stage's share
    assert set(of_full) == {32, 48} and rates[(0.25, "pixel", 32)]["images"] == of_full[32]["images"] == 100
    full_flops = flops(32, decode_fraction=0.25, decode_of_size=cfg.data.crop_size)
    assert of_full[32]["gflop_per_image"] == pytest.approx(full_flops / 1e9) and full_flops > flops(
        32, decode_fraction=0.25
    )
    assert "| 0.25 of full_size | pixel | 32 |" in stage_rate_table(listed, "cpu")


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "study").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_config_loads_with_valid_runs(path, tmp_path):
    """Each study config, and every run's pretraining config in it, passes validation (a typo fails here, not
    hours in)."""
    from mae_et.train.config import load_pretrain_config

    study = load_study(path)
    assert study.run_names[0] == "baseline" and study.seeds
    for run, spec in study.runs.items():
        budget = 1.0 if spec.budget == EQUAL_TIME else spec.budget
        cfg = load_pretrain_config(
            study.recipe, pretrain_overrides(study, run, 0, study.epochs * budget, MINI, tmp_path)
        )
        assert cfg.name.startswith(run)


def test_quiet_cpu_clock_ignores_other_work(tmp_path):
    """Per stage, the fastest-decile window's CPU seconds per step times the stage's steps, its first window left
    out: windows slowed 2x by a neighbour (even most of them) move the total CPU time, not the quiet one. Older
    records get it from their run folder's metrics.jsonl."""
    per_step = {32: 1.0, 48: 2.0}
    slowed = {(32, 0), (32, 3), (48, 2), (48, 3), (48, 4), (48, 5), (48, 6), (48, 7)}  # the start, and most of stage 48
    records, step, cpu = [], 0, 0.0
    for size in (32, 48):
        for w in range(11):
            step += 10
            cpu += 10 * per_step[size] * (2.0 if (size, w) in slowed else 1.0)
            records.append({"step": step, "size": size, "cpu_s": cpu, "elapsed_s": cpu, "images_per_sec": 1.0})
    assert quiet_cpu_seconds(records) == pytest.approx(110 * 1.0 + 110 * 2.0)
    assert training_clock(records[-1])[1] == pytest.approx(130 + 340)  # the slowed windows counted in full
    assert quiet_cpu_seconds(records, quantile=0.5) == pytest.approx(110 * 1.0 + 110 * 4.0)  # the median moved
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert backfill_quiet_cpu({"run_dir": str(run), "cpu_s": 999.0})["quiet_cpu_s"] == pytest.approx(330.0)
    assert backfill_quiet_cpu({"run_dir": str(tmp_path / "gone")}) == {"run_dir": str(tmp_path / "gone")}
