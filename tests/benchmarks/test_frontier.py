"""The frontier of a study: families of runs as accuracy-vs-CPU-time curves, each point read against the other
families at the same CPU time, a table and a plot, in the report of a study whose config has `frontier:`."""

from __future__ import annotations

import math

import pytest
import yaml

from benchmarks.study.config import ACCURACY_KEYS, StudyError, load_study
from benchmarks.study.frontier import Point, comparisons, parity, parity_lines, points, read_at
from benchmarks.study.summary import spread


def acc(value: float, values=None) -> dict:
    return {k: spread(values or [value]) for k in ACCURACY_KEYS}


def test_a_curve_is_read_linearly_in_log_time_between_its_points_and_not_beyond():
    curve = [Point("plain", "a", 1, 100.0, 4.0, acc(40.0)), Point("plain", "b", 1, 400.0, 1.0, acc(50.0))]
    assert read_at(curve, 200.0, "linear_top1") == pytest.approx(45.0)  # half way in log time
    assert read_at(curve, 100.0, "linear_top1") == 40.0 and read_at(curve, 400.0, "linear_top1") == 50.0
    assert read_at(curve, 99.0, "linear_top1") is None and read_at(curve, 401.0, "linear_top1") is None
    assert read_at(curve[:1], 100.0, "linear_top1") == 40.0


def test_points_and_comparisons_from_a_summary():
    """CPU time from the recorded clock (mean over seeds), speed-up against the baseline, each curriculum point
    against the plain curve at its CPU time, and a plain point against the curriculum's where it covers it."""

    def row(cpu, a, seeds=(0,)):
        return {
            "cpu_s": spread([cpu] * len(seeds)),
            **{k: spread([a + i for i in range(len(seeds))]) for k in ACCURACY_KEYS},
        }

    summary = {
        "baseline": row(1000.0, 50.0, (0, 1)),
        "baseline_b050": row(500.0, 44.0),
        "baseline_b025": row(250.0, 38.0),
        "etpp_b050": row(560.0, 51.0, (0, 1)),
        "etpp_b025": row(300.0, 45.0),
        "untrained": row(0.0, 30.0),
    }
    frontier = {
        "reference": "plain",
        "families": {
            "plain": ["baseline_b025", "baseline_b050", "baseline"],
            "etpp": ["etpp_b050", "etpp_b025", "etpp_b010"],
        },
    }
    pts = points(frontier, summary, None)
    assert [(p.family, p.run) for p in pts] == [
        ("plain", "baseline_b025"),
        ("plain", "baseline_b050"),
        ("plain", "baseline"),
        ("etpp", "etpp_b025"),
        ("etpp", "etpp_b050"),  # cheapest first; etpp_b010 not measured
    ]
    assert pts[2].seeds == 2 and pts[2].accuracy["linear_top1"]["mean"] == 50.5
    assert pts[4].speedup == pytest.approx(1000 / 560)
    cmp = {(c["run"], c["against"]): c["minus_other"]["linear_top1"] for c in comparisons(frontier, pts)}
    t = math.log(560 / 500) / math.log(1000 / 500)
    assert cmp[("etpp_b050", "plain")] == pytest.approx(51.5 - (44.0 + t * (50.5 - 44.0)))
    t = math.log(300 / 250) / math.log(500 / 250)
    assert cmp[("etpp_b025", "plain")] == pytest.approx(45.0 - (38.0 + t * 6.0))
    assert cmp[("baseline_b050", "etpp")] == pytest.approx(
        44.0 - (45.0 + math.log(500 / 300) / math.log(560 / 300) * 6.5)
    )
    assert ("baseline", "etpp") not in cmp and ("baseline_b025", "etpp") not in cmp  # outside etpp's curve


def test_parity_holds_a_point_to_the_baseline_seed_by_seed_and_names_the_cheapest():
    """Bounds: the baseline's worst seed for within_seed_range, its mean minus max_drop for the rest. A point whose
    mean clears every bound but one seed of which falls below is not at parity; a point of one seed is not judged."""
    base = {"cpu_s": spread([1000.0, 1000.0]), **acc(0, [50.0, 52.0])}
    summary = {
        "baseline": base,
        "cheap_one_seed": {**acc(0, [60.0]), "cpu_s": spread([200.0])},  # holds, but one seed of two
        "cheap_bad_seed": {**acc(0, [49.0, 60.0]), "cpu_s": spread([300.0, 300.0])},  # mean 54.5, seed 0 below 50
        "half": {**acc(0, [50.0, 50.5]), "cpu_s": spread([500.0, 500.0])},  # at the worst seed: holds
        "dearer": {**acc(0, [55.0, 55.0]), "cpu_s": spread([700.0, 700.0])},
    }
    summary["half"]["finetune_top1"] = spread([50.0, 50.2])  # 50.0 = 51 - 1: at the bound
    frontier = {"reference": "plain", "families": {"plain": ["baseline"], "c": [r for r in summary if r != "baseline"]}}
    spec = {"within_seed_range": ["knn_top1_cls", "knn_top1_mean", "linear_top1"], "max_drop": {"finetune_top1": 1.0}}
    result = parity(spec, points(frontier, summary, None), summary)

    assert result["bounds"] == {"knn_top1_cls": 50.0, "knn_top1_mean": 50.0, "linear_top1": 50.0, "finetune_top1": 50.0}
    rows = {r["run"]: r for r in result["points"]}
    assert [r["run"] for r in result["points"]] == ["cheap_one_seed", "cheap_bad_seed", "half", "dearer"]
    assert rows["cheap_one_seed"]["below"] == {} and not rows["cheap_one_seed"]["all_seeds"]
    assert rows["cheap_bad_seed"]["below"] == {k: [49.0] for k in ACCURACY_KEYS}
    assert rows["half"]["below"] == {} and rows["half"]["all_seeds"] and rows["half"]["speedup"] == 2.0
    assert result["cheapest"] == "half"

    pts = [p.__dict__ for p in points(frontier, summary, None)]
    text = "\n".join(parity_lines(result, pts))
    assert (
        "| cheap_bad_seed | 300 | 3.33x | 49.00 / 60.00 |" in text
        and "| no, below: kNN cls 49.00, kNN mean 49.00," in text
    )
    assert "| cheap_one_seed | 200 | 5.00x | 60.00 |" in text and "on its seed only (not judged)" in text
    assert text.endswith("cheapest at parity on every seed: half, 500 CPU s, 2.00x less than the baseline")

    summary["half"]["finetune_top1"] = spread([49.9, 50.2])
    summary["dearer"]["linear_top1"] = spread([55.0, 49.0])
    none = parity(spec, points(frontier, summary, None), summary)
    assert none["cheapest"] is None
    assert parity_lines(none, pts)[-1] == "cheapest at parity on every seed: none of the points"


def test_a_parity_of_unknown_accuracies_is_refused(tmp_path):
    from helpers import REPO

    raw = yaml.safe_load((REPO / "configs" / "study" / "mini_cpu-smoke.yaml").read_text())
    raw["pretrain"]["recipe"] = str(REPO / "configs" / "pretrain" / "mae_vit-micro-p8_et_cpu-test.yaml")
    raw["eval"]["finetune"]["recipe"] = str(REPO / "configs" / "finetune" / "vit-micro-p8_mae_cpu-test.yaml")
    raw["frontier"]["parity"] = {"within_seed_range": ["knn_top5"]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match=r"frontier.parity needs .*unknown: \['knn_top5'\]"):
        load_study(path)


def test_a_frontier_of_unknown_runs_is_refused(tmp_path):
    from helpers import REPO

    raw = yaml.safe_load((REPO / "configs" / "study" / "imagenette_vit-t8_64px_20e_frontier_cpu.yaml").read_text())
    raw["frontier"]["families"]["plain MAE"].append("nope")
    for key in ("recipe",):
        raw["pretrain"][key] = str(REPO / "configs" / "pretrain" / "mae_vit-base-p16_baseline_800e_imagenet.yaml")
    raw["eval"]["finetune"]["recipe"] = str(REPO / "configs" / "finetune" / "vit-base-p16_mae_100e_imagenet.yaml")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match="frontier needs .*unknown runs: \\['nope'\\]"):
        load_study(path)
