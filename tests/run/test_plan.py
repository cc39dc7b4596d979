"""The run's plan: lr scaling, the continuous warmup + cosine schedule, and the log / checkpoint cadence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mae_et.curriculum.schedules import Stage, plan_curriculum, preset_stages
from mae_et.run.plan import RunPlan, lr_at, scaled_lr


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


def test_cadence_takes_the_launchs_last_step():
    plan = RunPlan(
        plan=plan_curriculum([Stage(224, 1.0)], "epochs", 1, 10, 224),
        global_batch=1,
        steps_per_epoch=10,
        end_step=7,  # train.max_steps
        base_lr=1.0,
        min_lr=0.0,
        warmup=0.0,
        log_every=3,
        ckpt_every=None,
    )
    steps = range(1, 8)
    assert [s for s in steps if plan.due(s, 3)] == [3, 6, 7]
    assert not any(plan.due(s, None) for s in steps)  # a monitor that is off
    assert [s for s in steps if plan.checkpoint_due(s)] == [7]  # checkpoints off: the last step only
    assert [s for s in steps if replace(plan, ckpt_every=2).checkpoint_due(s)] == [2, 4, 6, 7]
