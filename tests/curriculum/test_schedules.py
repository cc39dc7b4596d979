"""Tests for mae_et.curriculum.schedules."""

from __future__ import annotations

import math

import pytest

from mae_et.curriculum.schedules import (
    BUDGETS,
    PRESETS,
    CurriculumConfig,
    CurriculumPlan,
    Stage,
    default_budget,
    plan_curriculum,
    preset_stages,
    relative_compute,
    resolve_curriculum,
    stage_at,
    validate_stages,
)
from mae_et.recipes import ConfigError


def _sizes(stages) -> list[int]:
    return [st.size for st in stages]


def test_et_preset_224() -> None:
    stages = preset_stages("et", 224, 16)
    assert _sizes(stages) == [160, 192, 224]
    assert [st.fraction for st in stages] == [0.6, 0.2, 0.2]
    rc = relative_compute(stages, "epochs", 224)
    assert rc == pytest.approx(0.6 * (160 / 224) ** 2 + 0.2 * (192 / 224) ** 2 + 0.2)
    assert abs(rc - 0.65) < 0.01
    assert default_budget("et") == "epochs"


def test_etpp_and_none_presets_224() -> None:
    assert _sizes(preset_stages("etpp", 224, 16)) == [96, 96, 160, 160, 160, 160, 192, 192, 224, 224]
    assert math.fsum(st.fraction for st in preset_stages("etpp", 224, 16)) == pytest.approx(1.0)
    assert preset_stages("none", 224, 16) == [Stage(224, 1.0)]
    assert default_budget("etpp") == "compute"
    assert default_budget("none") == "epochs"
    assert relative_compute(preset_stages("etpp", 224, 16), "compute", 224) == 1.0
    assert relative_compute(preset_stages("none", 224, 16), "epochs", 224) == 1.0


def test_presets_scale() -> None:
    assert _sizes(preset_stages("et", 64, 8)) == [48, 56, 64]
    assert _sizes(preset_stages("et", 112, 16)) == [80, 96, 112]
    assert _sizes(preset_stages("etpp", 112, 16)) == [48, 48, 80, 80, 80, 80, 96, 96, 112, 112]
    assert _sizes(preset_stages("etpp", 64, 8)) == [24, 24, 48, 48, 48, 48, 56, 56, 64, 64]
    # Tiny crops keep at least 2 patches per side.
    assert _sizes(preset_stages("etpp", 32, 16)) == [32] * 10
    for name in PRESETS:
        for full, patch in ((224, 16), (64, 8), (112, 16), (32, 16)):
            validate_stages(preset_stages(name, full, patch), full, patch)


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match=r"unknown curriculum preset 'fast'.*none, et, etpp"):
        preset_stages("fast", 224, 16)
    with pytest.raises(ValueError, match=r"unknown curriculum preset"):
        default_budget("fast")
    with pytest.raises(ValueError, match=r"unknown curriculum budget 'flops'.*epochs, compute"):
        plan_curriculum(preset_stages("et", 224, 16), "flops", 10, 10, 224)
    with pytest.raises(ValueError, match=r"unknown curriculum budget"):
        relative_compute(preset_stages("et", 224, 16), "flops", 224)
    with pytest.raises(ValueError, match=r"crop size 100 is not a multiple of the patch size 16"):
        preset_stages("et", 100, 16)


@pytest.mark.parametrize(
    ("stages", "match"),
    [
        ([], r"no stages"),
        ([Stage(256, 1.0)], r"curriculum size 256 is above the crop size 224"),
        ([Stage(168, 0.5), Stage(224, 0.5)], r"curriculum size 168 is not a multiple of the patch size 16"),
        ([Stage(0, 0.5), Stage(224, 0.5)], r"curriculum size 0 is below the patch size 16"),
        ([Stage(160, 0.0), Stage(224, 1.0)], r"fraction 0.0 must be > 0"),
        ([Stage(160, -0.2), Stage(224, 1.2)], r"fraction -0.2 must be > 0"),
        ([Stage(160, 0.5), Stage(224, 0.4)], r"fractions sum to 0.9, not 1"),
        ([Stage(160.0, 1.0)], r"size 160.0 is not an integer"),
    ],
)
def test_validate_errors(stages: list[Stage], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_stages(stages, 224, 16)


def test_validate_tolerance() -> None:
    validate_stages([Stage(160, 0.6 + 5e-7), Stage(224, 0.4)], 224, 16)
    with pytest.raises(ValueError, match="sum to"):
        validate_stages([Stage(160, 0.6 + 5e-6), Stage(224, 0.4)], 224, 16)


def test_stage_at_boundaries() -> None:
    et = preset_stages("et", 224, 16)
    assert stage_at(et, 0.0).size == 160
    assert stage_at(et, 0.5999).size == 160
    assert stage_at(et, 0.6).size == 192
    assert stage_at(et, 0.7999).size == 192
    assert stage_at(et, 0.8).size == 224
    assert stage_at(et, 1.0).size == 224
    # Float sums of 0.1 must not push a boundary: progress 0.3 is the start of stage 3.
    etpp = [Stage(16 * (k + 1), 0.1) for k in range(10)]
    for k in range(10):
        assert stage_at(etpp, k / 10) is etpp[k]
    assert stage_at(etpp, 1.0) is etpp[-1]
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        stage_at(et, 1.5)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        stage_at(et, -0.1)


def _check_covering(plan: CurriculumPlan) -> None:
    """stage_at_step visits every stage in order, each step exactly once."""
    seen = [plan.stage_at_step(s).index for s in range(plan.total_steps)]
    assert seen == sorted(seen)
    for st in plan.stages:
        assert st.num_steps >= 1
        assert seen.count(st.index) == st.num_steps
        assert seen.index(st.index) == st.start_step
    assert plan.stage_at_step(plan.total_steps) is plan.stages[-1]
    assert plan.stage_at_step(plan.total_steps + 100) is plan.stages[-1]


def test_epochs_plan_cumulative_rounding() -> None:
    stages = preset_stages("et", 224, 16)
    for epochs, spe in ((100, 1251), (7.3, 13), (1, 3), (0.5, 7), (0.3, 10)):
        plan = plan_curriculum(stages, "epochs", epochs, spe, 224)
        assert plan.total_steps == math.floor(epochs * spe + 0.5)
        _check_covering(plan)
    # Three stages of 1/3 over 10 steps: per-stage rounding gives 3+3+3=9, cumulative gives 10.
    thirds = [Stage(160, 1 / 3), Stage(192, 1 / 3), Stage(224, 1 / 3)]
    plan = plan_curriculum(thirds, "epochs", 1, 10, 224)
    assert plan.total_steps == 10
    assert [st.num_steps for st in plan.stages] == [3, 4, 3]
    et = plan_curriculum(stages, "epochs", 100, 1000, 224)
    assert [st.num_steps for st in et.stages] == [60000, 20000, 20000]
    assert et.epoch_at_step(60000) == 60.0


def test_every_stage_gets_a_step() -> None:
    # 0.1 epoch of 10 steps under compute budget: about 1.7 steps for 10 stages.
    plan = plan_curriculum(preset_stages("etpp", 224, 16), "compute", 0.1, 10, 224)
    assert [st.num_steps for st in plan.stages] == [1] * 10
    _check_covering(plan)
    # 3 steps for 3 stages (0.6/0.2/0.2): the minimum of 1 each does not overshoot the total.
    plan = plan_curriculum(preset_stages("et", 224, 16), "epochs", 1, 3, 224)
    assert [st.num_steps for st in plan.stages] == [1, 1, 1]
    # Very short runs: one step per stage even when the budget asks for fewer.
    plan = plan_curriculum(preset_stages("et", 224, 16), "epochs", 1, 1, 224)
    assert plan.total_steps == 3
    _check_covering(plan)


def test_etpp_equal_compute() -> None:
    epochs, spe, full = 100, 50, 224
    plan = plan_curriculum(preset_stages("etpp", full, 16), "compute", epochs, spe, full)
    _check_covering(plan)
    # Each stage spends a tenth of the budget: num_steps * (B/full)^2 full-size steps, within one step.
    budget_steps = epochs * spe
    for st in plan.stages:
        compute = st.num_steps * (st.size / full) ** 2
        assert abs(compute - budget_steps / 10) <= 1.0
    total = sum(st.num_steps * (st.size / full) ** 2 for st in plan.stages)
    assert abs(total - budget_steps) <= 1.0
    for row in plan.summary():
        assert row["compute_share"] == pytest.approx(0.1, abs=1e-3)
    # The 96-px stages see (224/96)^2 times more images than the 224-px ones.
    assert plan.stages[0].num_steps == pytest.approx(plan.stages[-1].num_steps * (224 / 96) ** 2, abs=1)
    assert plan.epoch_at_step(plan.total_steps) > epochs  # more images than epochs of full size


@pytest.mark.parametrize(
    ("name", "budget"), [("et", "epochs"), ("etpp", "compute"), ("etpp", "epochs"), ("none", "epochs")]
)
def test_progress_monotone_and_continuous(name: str, budget: str) -> None:
    full = 224
    plan = plan_curriculum(preset_stages(name, full, 16), budget, 3, 37, full)
    progress = [plan.progress_at_step(s) for s in range(plan.total_steps + 1)]
    assert progress[0] == 0.0
    assert progress[-1] == 1.0
    assert plan.progress_at_step(plan.total_steps + 5) == 1.0
    total_cost = sum(st.num_steps * (1.0 if budget == "epochs" else (st.size / full) ** 2) for st in plan.stages)
    for s in range(plan.total_steps):
        st = plan.stage_at_step(s)
        step_share = (1.0 if budget == "epochs" else (st.size / full) ** 2) / total_cost
        # Monotone, and each step advances by exactly its own share: no jump at stage changes.
        assert progress[s + 1] - progress[s] == pytest.approx(step_share, rel=1e-9)
    for st in plan.stages:
        assert st.progress_start == plan.progress_at_step(st.start_step)
        assert st.progress_end == plan.progress_at_step(st.start_step + st.num_steps)
    assert plan.stages[-1].progress_end == 1.0


def test_progress_matches_stage_at() -> None:
    # With exact rounding, the stage chosen by progress agrees with the stage chosen by step.
    stages = preset_stages("et", 224, 16)
    plan = plan_curriculum(stages, "epochs", 10, 100, 224)
    for s in range(plan.total_steps):
        assert stage_at(stages, plan.progress_at_step(s)).size == plan.stage_at_step(s).size


def test_summary_and_plan_errors() -> None:
    plan = plan_curriculum(preset_stages("et", 224, 16), "epochs", 10, 100, 224)
    rows = plan.summary()
    assert [r["size"] for r in rows] == [160, 192, 224]
    assert [r["steps"] for r in rows] == [600, 200, 200]
    assert [r["epochs"] for r in rows] == [6.0, 2.0, 2.0]
    assert sum(r["compute_share"] for r in rows) == pytest.approx(1.0)
    assert set(BUDGETS) == {"epochs", "compute"}
    with pytest.raises(ValueError, match="epochs 0 must be > 0"):
        plan_curriculum(preset_stages("et", 224, 16), "epochs", 0, 100, 224)
    with pytest.raises(ValueError, match="steps_per_epoch 0 must be >= 1"):
        plan_curriculum(preset_stages("et", 224, 16), "epochs", 1, 0, 224)
    with pytest.raises(ValueError, match="above the crop size 112"):
        plan_curriculum(preset_stages("et", 224, 16), "epochs", 1, 10, 112)
    with pytest.raises(ValueError, match="negative"):
        plan.stage_at_step(-1)
    with pytest.raises(ValueError, match="negative"):
        plan.progress_at_step(-1)


def test_a_curriculum_section_resolves_to_checked_stages_and_its_budget() -> None:
    """A preset (or the explicit stages), each lifted to min_size; the preset's budget unless one is given."""
    assert resolve_curriculum(CurriculumConfig("et"), 224, 16) == (preset_stages("et", 224, 16), "epochs")
    stages, budget = resolve_curriculum(CurriculumConfig("etpp", budget="epochs", min_size=128), 224, 16)
    assert budget == "epochs" and min(_sizes(stages)) == 128
    explicit = [Stage(160, 0.5), Stage(224, 0.5)]
    assert resolve_curriculum(CurriculumConfig("custom", explicit), 224, 16) == (explicit, "epochs")
    with pytest.raises(ConfigError, match="curriculum.schedule=custom needs curriculum.stages"):
        resolve_curriculum(CurriculumConfig("custom"), 224, 16)
    with pytest.raises(ConfigError, match="curriculum: curriculum size 40 is not a multiple of the patch size 16"):
        resolve_curriculum(CurriculumConfig("custom", [Stage(40, 1.0)]), 224, 16)
