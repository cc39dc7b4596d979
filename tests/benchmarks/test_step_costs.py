"""benchmarks/step_costs.py on the mini smoke study: every (run, B) of the plans timed in rotating rounds in one
process; each run's predicted time is its plan's steps per stage times those medians."""

from __future__ import annotations

import json
import statistics

import pytest
from helpers import REPO, load_benchmark

from mae_et.files import FileError


@pytest.fixture(scope="module")
def costs(tmp_path_factory):
    out = tmp_path_factory.mktemp("step_costs")
    script = load_benchmark("step_costs")
    result = script.main(
        [
            "--study",
            str(REPO / "configs" / "study" / "mini_cpu-smoke.yaml"),
            "--images",
            "240",
            "--rounds",
            "3",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--out",
            str(out),
        ]
    )
    return script, result, out


def test_predictions_are_the_plans_times_the_median_step_costs(costs):
    script, result, out = costs
    assert set(result["predicted"]) == {"baseline", "et", "etpp_half"}  # the equal-time run has no budget of its own
    for name, runs in result["runs"].items():
        assert len(runs) == 3 and result["median"][name]["cpu_s"] == statistics.median(r["cpu_s"] for r in runs)
    for run, p in result["predicted"].items():
        assert p["cpu_s"] == pytest.approx(sum(n * result["median"][f"{run}@{b}"]["cpu_s"] for b, n in p["stages"]))
        assert result["speedups"][run]["cpu_s"] == pytest.approx(result["predicted"]["baseline"]["cpu_s"] / p["cpu_s"])
    assert [tuple(s) for s in result["predicted"]["baseline"]["stages"]] == [(48, 30)]  # 240 images / batch 16 x E = 2
    assert {b for b, _ in result["predicted"]["et"]["stages"]} == {32, 40, 48}
    assert len({tuple(o) for o in result["order"]}) == 3  # the order rotates
    saved = json.loads((out / "step_costs.json").read_text())
    assert saved["median"] == json.loads(json.dumps(result["median"])) and saved["steps_per_epoch"] == 15
    assert "| etpp_half |" in (out / "step_costs.md").read_text()


def test_an_existing_result_is_not_overwritten_silently(costs):
    script, _, out = costs
    with pytest.raises(FileError, match="already holds step_costs.json; pass --overwrite"):
        script.main(
            ["--study", str(REPO / "configs" / "study" / "mini_cpu-smoke.yaml"), "--images", "240", "--out", str(out)]
        )


def test_a_step_shared_by_runs_is_timed_once_and_ablation_rows_are_predicted(tmp_path):
    """Plain MAE at two budgets is one step: timed once, each run predicted from its own plan; an ablation's rows
    (another decoded share) are contenders of their own."""
    import yaml

    from benchmarks.study.config import load_study

    raw = yaml.safe_load((REPO / "configs" / "study" / "mini_cpu-smoke.yaml").read_text())
    raw.pop("frontier")
    raw["runs"] = {
        "baseline": {"budget": 1.0, "overrides": {"curriculum.schedule": "none"}},
        "baseline_half": {"budget": 0.5, "overrides": {"curriculum.schedule": "none"}},
    }
    raw["targets"] = {"runs": {}}
    raw["ablations"] = {"partial": {"runs": ["baseline_half"], "overrides": {"model.decode_fraction": 0.25}}}
    for key in ("recipe",):
        raw["pretrain"][key] = str((REPO / "configs" / "study" / raw["pretrain"][key]).resolve())
    raw["eval"]["finetune"]["recipe"] = str((REPO / "configs" / "study" / raw["eval"]["finetune"]["recipe"]).resolve())
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    script = load_benchmark("step_costs")
    result = script.measure(load_study(path), steps_per_epoch=15, rounds=1, warmup=0, steps=1, ablations=["partial"])
    assert set(result["runs"]) == {"baseline@48", "baseline_half+partial@48"}  # two steps timed, not three
    assert result["timed_as"] == {"baseline_half@48": "baseline@48"}
    assert result["median"]["baseline_half@48"] == result["median"]["baseline@48"]
    predicted = result["predicted"]
    assert [tuple(s) for s in predicted["baseline_half"]["stages"]] == [(48, 15)]
    assert predicted["baseline_half"]["cpu_s"] == pytest.approx(predicted["baseline"]["cpu_s"] / 2)
    assert predicted["baseline_half+partial"]["cpu_s"] == pytest.approx(
        15 * result["median"]["baseline_half+partial@48"]["cpu_s"]
    )
    with pytest.raises(Exception, match="--ablations"):
        script.main(["--study", str(path), "--images", "240", "--ablations", "nope", "--out", str(tmp_path / "o")])
