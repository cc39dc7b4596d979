"""The EfficientTrain input-size curriculum as data: stages, presets, the recipe's `curriculum:` section (pretraining's
and fine-tuning's) and its resolution, and the layout in optimizer steps (what a stage's fraction is a share of:
docs/design.md)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Literal, get_args

from mae_et.curriculum.frequency import FrequencyMode
from mae_et.recipes import ConfigError, Positive

Preset = Literal["none", "et", "etpp"]
Budget = Literal["epochs", "compute"]
PRESETS: tuple[str, ...] = get_args(Preset)
BUDGETS: tuple[str, ...] = get_args(Budget)

# Presets as published, for a 224 crop: (size at 224, fraction).
_PRESETS_224: dict[str, tuple[tuple[int, float], ...]] = {
    "none": ((224, 1.0),),
    # ET: 60 / 20 / 20 % of the epochs at 160 / 192 / 224.
    "et": ((160, 0.6), (192, 0.2), (224, 0.2)),
    # ET++: ten stages of equal compute.
    "etpp": tuple((b, 0.1) for b in (96, 96, 160, 160, 160, 160, 192, 192, 224, 224)),
}
_DEFAULT_BUDGET = {"none": "epochs", "et": "epochs", "etpp": "compute"}

# Fractions must sum to 1 within this.
_FRACTION_TOL = 1e-6
# Progress this close below a stage boundary counts as past it, so that float sums
# such as 0.1 + 0.1 + 0.1 do not put progress 0.3 in the wrong stage.
_BOUNDARY_EPS = 1e-9


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule; also the type of a recipe's `curriculum.stages` entries, whose fields the config
    loader checks against these types (a size of 40.9 is an error there, never 40)."""

    size: int  # input side B in pixels
    fraction: float  # share of the budget; fractions of a schedule sum to 1


def _round_half_up(x: float) -> int:
    """Nearest integer, halves up (Python's round() goes to even)."""
    return int(math.floor(x + 0.5))


def _check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown curriculum preset {name!r}; valid presets: {', '.join(PRESETS)}")


def _check_budget(budget: str) -> None:
    if budget not in BUDGETS:
        raise ValueError(f"unknown curriculum budget {budget!r}; valid budgets: {', '.join(BUDGETS)}")


def preset_stages(name: str, full_size: int, patch_size: int) -> list[Stage]:
    """A preset scaled from 224 to `full_size`, sizes snapped to multiples of `patch_size`."""
    _check_preset(name)
    if patch_size < 1 or full_size % patch_size != 0:
        raise ValueError(f"crop size {full_size} is not a multiple of the patch size {patch_size}")
    stages = []
    for size_224, fraction in _PRESETS_224[name]:
        patches = _round_half_up(full_size * size_224 / 224 / patch_size)
        # At least 2 patches per side so the stage is a real image; never above the crop.
        size = min(max(patches, 2) * patch_size, full_size)
        stages.append(Stage(size=size, fraction=fraction))
    return stages


def default_budget(name: str) -> str:
    """The budget a preset was published with: "epochs" for none/et, "compute" for etpp."""
    _check_preset(name)
    return _DEFAULT_BUDGET[name]


def _check_schedule(stages: Sequence[Stage], full_size: int) -> None:
    """Checks that need no patch size (shared by validation and planning)."""
    if len(stages) == 0:
        raise ValueError("curriculum has no stages")
    for k, st in enumerate(stages):
        if isinstance(st.size, bool) or not isinstance(st.size, int):
            raise ValueError(f"curriculum stage {k}: size {st.size!r} is not an integer")
        if st.size > full_size:
            raise ValueError(f"curriculum size {st.size} is above the crop size {full_size}")
        if not (math.isfinite(st.fraction) and st.fraction > 0):
            raise ValueError(f"curriculum stage {k} (size {st.size}): fraction {st.fraction} must be > 0")
    total = math.fsum(st.fraction for st in stages)
    if abs(total - 1.0) > _FRACTION_TOL:
        raise ValueError(f"curriculum fractions sum to {total:.6g}, not 1")


def validate_stages(stages: Sequence[Stage], full_size: int, patch_size: int) -> None:
    """Raise ValueError (one line) if `stages` is not a usable schedule."""
    if patch_size < 1 or full_size % patch_size != 0:
        raise ValueError(f"crop size {full_size} is not a multiple of the patch size {patch_size}")
    _check_schedule(stages, full_size)  # empty, non-int size, above the crop, fractions
    for st in stages:
        if st.size < patch_size:
            raise ValueError(f"curriculum size {st.size} is below the patch size {patch_size}")
        if st.size % patch_size != 0:
            raise ValueError(f"curriculum size {st.size} is not a multiple of the patch size {patch_size}")


@dataclass
class CurriculumConfig:
    """The recipe section `curriculum:`."""

    schedule: Literal[Preset, "custom"] = "none"  # custom: `stages` is required
    stages: list[Stage] | None = None  # [{size: 160, fraction: 0.6}, ...] replaces the preset
    budget: Budget | None = None  # epochs | compute; default: the preset's (et: epochs, etpp: compute)
    mode: FrequencyMode = "fft"  # fft (EfficientTrain) | resize (EfficientTrain++)
    min_size: Annotated[int, Positive] | None = None  # a floor on every stage's B (a multiple of the patch); null: none


def resolve_curriculum(c: CurriculumConfig, full_size: int, patch_size: int) -> tuple[list[Stage], str]:
    """The checked stage list and budget of a recipe's curriculum section: the explicit stages or the preset's,
    each lifted to min_size; ConfigError in one line."""
    schedule, min_size = c.schedule, c.min_size
    if c.stages is not None:
        resolved = list(c.stages)  # each entry's types checked on load (the schema's Stage)
    elif schedule == "custom":
        raise ConfigError("curriculum.schedule=custom needs curriculum.stages: [{size: 160, fraction: 0.6}, ...]")
    else:
        try:
            resolved = preset_stages(schedule, full_size, patch_size)
        except ValueError as e:
            raise ConfigError(f"curriculum: {e}") from None
    if min_size is not None:
        if min_size % patch_size != 0 or not patch_size <= min_size <= full_size:
            raise ConfigError(
                f"curriculum.min_size {min_size} must be a multiple of the patch size {patch_size} "
                f"between {patch_size} and the crop size {full_size}"
            )
        resolved = [Stage(size=max(s.size, min_size), fraction=s.fraction) for s in resolved]
    try:
        validate_stages(resolved, full_size, patch_size)
    except ValueError as e:
        raise ConfigError(f"curriculum: {e}") from None
    return resolved, c.budget or default_budget(schedule if schedule != "custom" else "none")


def _stage_ends(stages: Sequence[Stage]) -> list[float]:
    """Cumulative budget progress at the end of each stage, normalised so the last is 1."""
    total = math.fsum(st.fraction for st in stages)
    ends, acc = [], 0.0
    for st in stages:
        acc += st.fraction
        ends.append(acc / total)
    return ends


def stage_at(stages: Sequence[Stage], progress: float) -> Stage:
    """The stage active at budget progress in [0, 1]; stage k covers [start_k, end_k)."""
    if len(stages) == 0:
        raise ValueError("curriculum has no stages")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress {progress} is outside [0, 1]")
    for st, end in zip(stages, _stage_ends(stages)):
        if progress < end - _BOUNDARY_EPS:
            return st
    return stages[-1]  # progress 1.0 (or within eps of it)


def relative_compute(stages: Sequence[Stage], budget: str, full_size: int) -> float:
    """Compute of the schedule / compute of the same `epochs` at full size."""
    _check_budget(budget)
    if budget == "compute":
        return 1.0  # the budget already is the compute
    return math.fsum(st.fraction * (st.size / full_size) ** 2 for st in stages)


@dataclass(frozen=True)
class PlannedStage:
    index: int
    size: int
    start_step: int  # first optimizer step of the stage
    num_steps: int
    progress_start: float  # budget progress at the stage start, in [0, 1]
    progress_end: float


@dataclass(frozen=True)
class CurriculumPlan:
    """A schedule laid out in optimizer steps."""

    stages: tuple[PlannedStage, ...]
    schedule: tuple[Stage, ...]  # the stages it was laid out from (`relative_compute` reads their fractions)
    budget: str
    full_size: int
    steps_per_epoch: int  # optimizer steps per pass over the data

    @property
    def total_steps(self) -> int:
        last = self.stages[-1]
        return last.start_step + last.num_steps

    def _step_cost(self, st: PlannedStage) -> float:
        """Budget consumed by one step of stage `st` (unnormalised)."""
        return 1.0 if self.budget == "epochs" else (st.size / self.full_size) ** 2

    def _index_at_step(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step {step} is negative")
        starts = [st.start_step for st in self.stages]
        return bisect.bisect_right(starts, step) - 1  # steps past the end land in the last stage

    def stage_at_step(self, step: int) -> PlannedStage:
        """The stage that step `step` runs in; steps >= total_steps give the last stage."""
        return self.stages[self._index_at_step(step)]

    def progress_at_step(self, step: int) -> float:
        """Budget progress in [0, 1] at the start of `step` (drives the LR schedule)."""
        if step < 0:
            raise ValueError(f"step {step} is negative")
        if step >= self.total_steps:
            return 1.0
        k = self._index_at_step(step)
        done = math.fsum(self._step_cost(st) * st.num_steps for st in self.stages[:k])
        cur = self.stages[k]
        done += self._step_cost(cur) * (step - cur.start_step)
        total = math.fsum(self._step_cost(st) * st.num_steps for st in self.stages)
        return done / total

    def epoch_at_step(self, step: int) -> float:
        """Epochs of images seen before `step` (images seen / dataset size)."""
        return step / self.steps_per_epoch

    def summary(self) -> list[dict]:
        """One dict per stage for logging."""
        total = math.fsum(self._step_cost(st) * st.num_steps for st in self.stages)
        return [
            {
                "stage": st.index,
                "size": st.size,
                "start_step": st.start_step,
                "steps": st.num_steps,
                "epochs": st.num_steps / self.steps_per_epoch,
                "compute_share": self._step_cost(st) * st.num_steps / total,
                "progress_start": st.progress_start,
                "progress_end": st.progress_end,
            }
            for st in self.stages
        ]


def plan_curriculum(
    stages: Sequence[Stage], budget: str, epochs: float, steps_per_epoch: int, full_size: int
) -> CurriculumPlan:
    """Lay a schedule out in optimizer steps for a run of `epochs` under `budget`."""
    _check_budget(budget)
    _check_schedule(stages, full_size)
    if not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs {epochs} must be > 0")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch {steps_per_epoch} must be >= 1")

    # Normalise fractions so a sum off by < 1e-6 does not shift the total.
    frac_total = math.fsum(st.fraction for st in stages)
    raw = []  # unrounded steps per stage
    for st in stages:
        steps = st.fraction / frac_total * epochs * steps_per_epoch
        if budget == "compute":
            steps *= (full_size / st.size) ** 2  # smaller images: more of them for the same compute
        raw.append(steps)

    # Round cumulative boundaries so the total is the rounded sum, not a sum of roundings.
    # Each stage gets >= 1 step; clamping each boundary to leave room for the stages after it
    # keeps the total exact unless the run is shorter than one step per stage.
    n = len(raw)
    total_steps = max(_round_half_up(math.fsum(raw)), n)
    bounds, acc, prev = [], 0.0, 0
    for k, r in enumerate(raw):
        acc += r
        prev = min(max(_round_half_up(acc), prev + 1), total_steps - (n - 1 - k))
        bounds.append(prev)

    starts = [0] + bounds[:-1]
    sizes = [st.size for st in stages]
    # Build without progress first, then fill progress from the plan's own progress_at_step
    # so stage boundaries and the per-step progress agree exactly.
    draft = CurriculumPlan(
        stages=tuple(
            PlannedStage(
                index=k,
                size=sizes[k],
                start_step=starts[k],
                num_steps=bounds[k] - starts[k],
                progress_start=0.0,
                progress_end=0.0,
            )
            for k in range(len(stages))
        ),
        schedule=tuple(stages),
        budget=budget,
        full_size=full_size,
        steps_per_epoch=steps_per_epoch,
    )
    planned = tuple(
        PlannedStage(
            index=st.index,
            size=st.size,
            start_step=st.start_step,
            num_steps=st.num_steps,
            progress_start=draft.progress_at_step(st.start_step),
            progress_end=draft.progress_at_step(st.start_step + st.num_steps),
        )
        for st in draft.stages
    )
    return replace(draft, stages=planned)
