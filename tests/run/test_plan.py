"""The run's plan: lr scaling and the continuous warmup + cosine schedule."""

from __future__ import annotations

import pytest

from mae_et.curriculum.schedules import plan_curriculum, preset_stages
from mae_et.run.plan import lr_at, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_warmup_then_cosine():
    assert lr_at(0.0, 1.0, 0.0, 0.1) == 0.0
    assert lr_at(0.05, 1.0, 0.0, 0.1) == pytest.approx(0.5)
    assert lr_at(0.1, 1.0, 0.0, 0.1) == pytest.approx(1.0)
    assert lr_at(0.55, 1.0, 0.0, 0.1) == pytest.approx(0.5)
    assert lr_at(1.0, 1.0, 0.1, 0.1) == pytest.approx(0.1)


def test_lr_is_continuous_across_curriculum_stages():
    plan = plan_curriculum(preset_stages("etpp", 224, 16), "compute", 10, 50, 224)
    lrs = [lr_at(plan.progress_at_step(s), 1.0, 0.0, 0.05) for s in range(plan.total_steps)]
    jumps = [abs(b - a) for a, b in zip(lrs, lrs[1:])]
    largest_step_share = max((st.size / 224) ** 2 for st in plan.stages) / sum(
        st.num_steps * (st.size / 224) ** 2 for st in plan.stages
    )
    # no jump bigger than what one step of progress can cause (slope of warmup: 1/0.05)
    assert max(jumps) <= largest_step_share / 0.05 + 1e-9
    boundary = plan.stages[2].start_step  # 96 -> 160
    assert abs(lrs[boundary] - lrs[boundary - 1]) < 0.01
