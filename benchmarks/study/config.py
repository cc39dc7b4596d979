"""The study config (`configs/study/*.yaml`) read into a `Study`: its runs, ablations, targets and evaluation; the
names of the study's own rows (baseline, untrained, '<run>+<ablation>'), and the seeds an ablation gets. Also
`row_config`: the pretraining config of any benchmark row, the study's and the benchmark scripts' alike."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks import REPO
from mae_et.errors import UserError

BASELINE = "baseline"  # the run every speed-up and accuracy is measured against (every study has one)
UNTRAINED = "untrained"  # E = 0: the floor
EQUAL_TIME = "equal_time"  # the budget of the run that gets et's time (needs runs named et and baseline)
EQUAL_TIME_OF = "et"
NO_MONITORS = ("tracking.recon_every_epochs=0", "tracking.knn_every_epochs=0")  # a row that trains watches nothing
CLOCKS = ("wall", "cpu")
ACCURACY_KEYS = ("knn_top1_cls", "knn_top1_mean", "linear_top1", "finetune_top1")
TIME_KEYS = ("wall_s", "cpu_s")
SUMMARY_KEYS = (
    "epochs",
    "steps",
    *TIME_KEYS,
    "steady_s",
    "quiet_cpu_s",
    "process_s",
    "s_per_epoch",
    "images_per_sec",
    "final_loss",
    "pflop",
    *ACCURACY_KEYS,
    "finetune_best_top1",
)


class StudyError(UserError, RuntimeError):
    """A study that cannot run as configured, or a run that failed; one line (plus a log tail)."""


@dataclass
class RunSpec:
    budget: float | str  # a multiple of E (epochs, or full-size-epoch compute for etpp), or "equal_time"
    overrides: list[str]
    seeds: list[int] | None = None  # the seeds this run gets (None: every seed of the study)

    def runs_on(self, seed: int) -> bool:
        return self.seeds is None or seed in self.seeds


@dataclass
class Ablation:
    """A variant of some curriculum runs, measured against the same seed's baseline (e.g. another position
    embedding, warm-up or stage floor): row `<run>+<name>` per listed run."""

    runs: list[str]
    overrides: list[str]
    warmup_fraction: float | None  # None: the study's


@dataclass
class Study:
    name: str
    path: Path
    data_root: Path | None
    seeds: list[int]
    recipe: Path  # the pretraining base recipe
    epochs: float  # E
    warmup_fraction: float
    checkpoint_every_epochs: float | None  # periodic checkpoints, so a killed run resumes (None: only the final one)
    verdict_clock: str  # wall | cpu: the clock of the verdicts' speed-ups and of the equal-time budget
    threads: int | None  # intra-op CPU threads of every run and evaluation (None: torch's default)
    overrides: list[str]  # pretraining overrides shared by every run
    runs: dict[str, RunSpec]  # in the config's order: the order they are pretrained and tabled in
    eval: dict[str, Any]
    finetune_recipe: Path
    finetune_overrides: list[str]
    reference: dict[str, Any]
    targets: dict[str, Any]  # {"runs": {row: RunTarget-like dict}, "min_gain_over_untrained": points} (`run_targets`)
    ablations: dict[str, Ablation]
    frontier: dict[str, Any] | None  # families of runs drawn as accuracy-vs-compute curves (`read_frontier`)
    peak_tflops: float
    assumed_mfu: float
    raw: dict[str, Any]

    @property
    def run_names(self) -> list[str]:
        return list(self.runs)


def accuracy_bounds(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """{within_seed_range: [keys], max_drop: {key: points}} as a target or frontier.parity gives them, and the keys
    among them that are not accuracies (the caller says where, in its message)."""
    bounds = {
        "within_seed_range": list(raw.get("within_seed_range") or []),
        "max_drop": {k: float(v) for k, v in (raw.get("max_drop") or {}).items()},
    }
    return bounds, [k for k in [*bounds["within_seed_range"], *bounds["max_drop"]] if k not in ACCURACY_KEYS]


def run_targets(raw: dict[str, Any], runs: dict[str, RunSpec], path: Path) -> dict[str, Any]:
    """The study's targets as {"runs": {row: {speedup, within_seed_range: [keys], max_drop: {key: points}}},
    "min_gain_over_untrained": points}: each listed run must be `speedup`x faster than the baseline on the verdict
    clock, each key of within_seed_range at or above the baseline's worst seed (mean - half-range), each key of
    max_drop at most that many points below the baseline's mean.

    The first edition's keys (et_speedup, etpp_speedup, etpp_max_drop, accuracy_keys) read as the same targets."""
    if "runs" in raw:
        per_run = {row: {"speedup": float(t["speedup"]), **accuracy_bounds(t)[0]} for row, t in raw["runs"].items()}
    else:
        keys = list(raw.get("accuracy_keys", ACCURACY_KEYS))
        per_run = {
            "et": {"speedup": float(raw["et_speedup"]), "within_seed_range": keys, "max_drop": {}},
            "etpp_half": {
                "speedup": float(raw["etpp_speedup"]),
                "within_seed_range": [],
                "max_drop": {k: float(raw["etpp_max_drop"]) for k in keys},
            },
        }
    for row, t in per_run.items():
        if row not in runs or row == BASELINE:
            raise StudyError(
                f"{path}: targets.runs.{row} is not a run of this study (other than the baseline); "
                f"its runs: {', '.join(r for r in runs if r != BASELINE)}"
            )
        unknown = accuracy_bounds(t)[1]
        if unknown:
            raise StudyError(
                f"{path}: targets.runs.{row}: accuracies {unknown} unknown; choose from {', '.join(ACCURACY_KEYS)}"
            )
    return {"runs": per_run, "min_gain_over_untrained": float(raw.get("min_gain_over_untrained", 0.0))}


def dotted(mapping: dict | None) -> list[str]:
    """{'model.size': 'small'} -> ['model.size="small"']: JSON is YAML, so each value parses back as written."""
    return [f"{key}={json.dumps(value)}" for key, value in (mapping or {}).items()]


def read_runs(raw: dict[str, Any], path: Path) -> dict[str, RunSpec]:
    """The config's `runs:`, checked: a baseline, no name of the study's own rows, budgets a multiple of E or
    equal_time (which needs a run `et` with a budget)."""
    runs = {
        name: RunSpec(
            spec["budget"],
            dotted(spec.get("overrides")),
            [int(s) for s in spec["seeds"]] if spec.get("seeds") is not None else None,
        )
        for name, spec in raw["runs"].items()
    }
    if BASELINE not in runs:
        raise StudyError(
            f"{path}: runs needs one named '{BASELINE}' (every speed-up and accuracy is measured against it)"
        )
    for name, spec in runs.items():
        if name == UNTRAINED or "+" in name:
            raise StudyError(
                f"{path}: runs.{name}: the name '{UNTRAINED}' and names with a '+' are the study's own rows"
            )
        if spec.budget != EQUAL_TIME and not (isinstance(spec.budget, (int, float)) and spec.budget > 0):
            raise StudyError(f"{path}: runs.{name}.budget must be a positive multiple of E or '{EQUAL_TIME}'")
        if spec.seeds is not None and (name == BASELINE or not set(spec.seeds) <= set(raw["seeds"])):
            raise StudyError(
                f"{path}: runs.{name}.seeds must be some of the study's seeds {raw['seeds']} (the baseline runs on all)"
            )
        if spec.budget == EQUAL_TIME and (EQUAL_TIME_OF not in runs or runs[EQUAL_TIME_OF].budget == EQUAL_TIME):
            raise StudyError(
                f"{path}: runs.{name}: budget '{EQUAL_TIME}' is {EQUAL_TIME_OF}'s time, and there is no "
                f"run '{EQUAL_TIME_OF}' with a budget"
            )
    return runs


def read_ablations(raw: dict[str, Any], runs: dict[str, RunSpec], path: Path) -> dict[str, Ablation]:
    """The config's `ablations:`, each naming pretraining runs with a budget of their own."""
    ablations = {}
    for name, spec in (raw.get("ablations") or {}).items():
        bad = [r for r in spec["runs"] if r not in runs or runs[r].budget == EQUAL_TIME]
        if bad or "+" in name:
            raise StudyError(
                f"{path}: ablations.{name}: runs {bad} are not pretraining runs with a budget (or the "
                f"name has a '+'); choose from {', '.join(r for r in runs if runs[r].budget != EQUAL_TIME)}"
            )
        ablations[name] = Ablation(
            list(spec["runs"]),
            dotted(spec.get("overrides")),
            float(spec["warmup_fraction"]) if spec.get("warmup_fraction") is not None else None,
        )
    return ablations


def read_clock_and_targets(raw: dict[str, Any], runs: dict[str, RunSpec], path: Path) -> tuple[str, dict[str, Any]]:
    """The verdict clock and the targets (`run_targets`), checked."""
    clock = raw.get("verdict_clock", "wall")
    if clock not in CLOCKS:
        raise StudyError(f"{path}: verdict_clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    unknown = [k for k in raw["targets"].get("accuracy_keys", ACCURACY_KEYS) if k not in ACCURACY_KEYS]
    if unknown:
        raise StudyError(f"{path}: targets.accuracy_keys {unknown} unknown; choose from {', '.join(ACCURACY_KEYS)}")
    return clock, run_targets(raw["targets"], runs, path)


def read_frontier(raw: dict[str, Any], runs: list[str], path: Path) -> dict[str, Any] | None:
    """The config's `frontier:` checked: families of the study's runs, a reference family among them."""
    spec = raw.get("frontier")
    if spec is None:
        return None
    families = {name: list(members) for name, members in (spec.get("families") or {}).items()}
    unknown = [r for members in families.values() for r in members if r not in runs]
    if len(families) < 2 or unknown or spec.get("reference") not in families:
        raise StudyError(
            f"{path}: frontier needs two or more families of the study's runs and a reference among them "
            f"(unknown runs: {unknown or 'none'})"
        )
    parity = spec.get("parity")
    if parity is not None:
        parity, unknown = accuracy_bounds(parity)
        if unknown or not (parity["within_seed_range"] or parity["max_drop"]):
            raise StudyError(
                f"{path}: frontier.parity needs within_seed_range and/or max_drop of the accuracies "
                f"{', '.join(ACCURACY_KEYS)} (unknown: {unknown or 'none'})"
            )
    return {
        "reference": spec["reference"],
        "families": families,
        "step_costs": spec.get("step_costs"),
        "parity": parity,
    }


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config '{path}' does not exist; pass --study configs/study/<name>.yaml")
    path = path.resolve()  # recipe paths are relative to it, whatever the folder a (sub)process runs in
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        pre, ev = raw["pretrain"], raw["eval"]
        runs = read_runs(raw, path)
        clock, targets = read_clock_and_targets(raw, runs, path)
        every = pre.get("checkpoint_every_epochs")
        ablations = read_ablations(raw, runs, path)
        return Study(
            name=raw["name"],
            path=path,
            # relative data roots are the repository's (e.g. .data/imagenette, ../shared/data/...)
            data_root=REPO / raw["data_root"] if raw.get("data_root") else None,
            seeds=[int(s) for s in raw["seeds"]],
            recipe=path.parent / pre["recipe"],
            epochs=float(pre["epochs"]),
            warmup_fraction=float(pre["warmup_fraction"]),
            checkpoint_every_epochs=float(every) if every else None,
            verdict_clock=clock,
            threads=int(raw["threads"]) if raw.get("threads") else None,
            overrides=dotted(pre.get("overrides")),
            runs=runs,
            eval=ev,
            finetune_recipe=path.parent / ev["finetune"]["recipe"],
            finetune_overrides=dotted(ev["finetune"].get("overrides")),
            reference=raw["reference"],
            targets=targets,
            ablations=ablations,
            frontier=read_frontier(raw, list(runs), path),
            peak_tflops=float(raw["flops"]["peak_tflops"]),
            assumed_mfu=float(raw["flops"]["assumed_mfu"]),
            raw=raw,
        )
    except KeyError as e:
        raise StudyError(f"{path}: missing key {e}; see configs/study/mini_cpu-smoke.yaml for the layout") from None


def run_name(run: str, seed: int) -> str:
    return f"{run}_seed{seed}"


def split_row(row: str) -> tuple[str, str | None]:
    """'et+pos_extent' -> ('et', 'pos_extent'); 'et' -> ('et', None)."""
    run, _, ablation = row.partition("+")
    return run, ablation or None


def ablation_seed_plan(tokens: list[str], ablations: list[str], seeds: list[int]) -> dict[str, list[int]]:
    """--ablation-seeds as {ablation: seeds}: plain seeds ('0 1') for every ablation, 'name=0,1' for one; an ablation
    not named gets the plain seeds given, else every seed of the study."""
    plain, named = [], {}
    for token in tokens:
        name, _, values = token.rpartition("=")
        try:
            parsed = [int(v) for v in values.split(",")]
        except ValueError:
            raise StudyError(
                f"--ablation-seeds {token}: give seeds ('0 1') or <ablation>=<seed>,<seed> (e.g. pos_extent=0,1)"
            ) from None
        if not name:
            plain.extend(parsed)
        elif name not in ablations:
            raise StudyError(
                f"--ablation-seeds {token}: '{name}' is not among --ablations ({', '.join(ablations) or 'none'})"
            )
        else:
            named[name] = parsed
    plan = {name: named.get(name, plain or list(seeds)) for name in ablations}
    missing = sorted({s for chosen in plan.values() for s in chosen} - set(seeds))
    if missing:
        raise StudyError(
            f"--ablation-seeds {missing} are not among --seeds {seeds}: an ablation is compared with its "
            "seed's baseline and run; add them to --seeds"
        )
    return plan


def row_config(
    recipe: str | Path, *overrides: str, model: str | None = None, batch: int | None = None, reads_data: bool = True
):
    """The pretraining config of one row: the recipe, then `overrides`, then the row's model size and batch (when
    given). A row that reads no image (`reads_data=False`: its config only shapes a model, a step or a plan) gets
    the fractal source, so the recipe's data folder need not exist."""
    from mae_et.train.config import load_pretrain_config  # here: reading a study config needs no torch

    shape = [f"model.size={model}"] if model is not None else []
    shape += [f"train.batch_size={batch}"] if batch is not None else []
    return load_pretrain_config(recipe, [*overrides, *shape, *([] if reads_data else ["data.source=fractal"])])
