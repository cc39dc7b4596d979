"""The accuracy-vs-compute frontier of a study whose config has a `frontier:` section: each family (a recipe at
several budgets) as a curve of each accuracy against pretraining CPU time, and, at every measured point, the
other families' curves read at the same CPU time (linear in log time between their two nearest points; nothing
outside a curve's range), so the table says which recipe is better there and by how much.

    frontier:
      reference: plain MAE                 # the family every other is compared with
      step_costs: benchmarks/results/step_costs/<study>/step_costs.json   # optional: CPU time from step costs
      families:
        plain MAE: [baseline_b025, baseline_b033, baseline]
        etpp + extent: [etpp_x_b025, etpp_x_b050]

CPU time is a point's predicted time from step costs measured side by side (`benchmarks/step_costs.py`), when the
config names a result of it for this study, since the rows' own clocks come from different sessions; else their
recorded CPU time (mean over seeds).

With `parity: {within_seed_range: [keys], max_drop: {key: points}}` every point is also held against the baseline
(the reference at its full budget) seed by seed, and the report names the cheapest point at parity on every seed."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import REPO
from benchmarks.study.config import ACCURACY_KEYS, BASELINE, UNTRAINED, StudyError

STEP_COSTS = "predicted from step costs"  # the frontier's clock when the config names step costs of this study
LABELS = {
    "knn_top1_cls": "kNN cls",
    "knn_top1_mean": "kNN mean",
    "linear_top1": "linear probe",
    "finetune_top1": "fine-tune",
}


@dataclass
class Point:
    family: str
    run: str
    seeds: int
    cpu_s: float  # the x of the curve
    speedup: float  # the baseline's CPU time / this point's, on the same clock
    accuracy: dict[str, dict]  # {key: spread over seeds}


def predicted_cpu(frontier: dict[str, Any], study_name: str) -> dict[str, float] | None:
    """{run: predicted CPU s} from the step costs the config names, if that file exists and measured this study."""
    if not frontier.get("step_costs") or not (REPO / frontier["step_costs"]).is_file():
        return None
    costs = json.loads((REPO / frontier["step_costs"]).read_text())
    if costs.get("study") != study_name:
        raise StudyError(f"{frontier['step_costs']} measured the study {costs.get('study')}, not {study_name}")
    return {run: p["cpu_s"] for run, p in costs["predicted"].items()}


def points(frontier: dict[str, Any], summary: dict[str, dict], predicted: dict[str, float] | None) -> list[Point]:
    """Every family's measured points (runs with an evaluation), cheapest first within a family."""

    def cpu(run: str) -> float:
        return predicted[run] if predicted else summary[run]["cpu_s"]["mean"]

    out = []
    for family, members in frontier["families"].items():
        measured = [r for r in members if r in summary and all(k in summary[r] for k in ACCURACY_KEYS)]
        for run in sorted(measured, key=cpu):
            out.append(
                Point(
                    family,
                    run,
                    len(summary[run]["cpu_s"]["values"]),
                    cpu(run),
                    cpu(BASELINE) / cpu(run),
                    {k: summary[run][k] for k in ACCURACY_KEYS},
                )
            )
    return out


def read_at(curve: list[Point], cpu_s: float, key: str) -> float | None:
    """The curve's mean accuracy at this CPU time: linear in log time between its two nearest points (its own
    point's value where it has one), None outside its range."""
    xs = [p.cpu_s for p in curve]
    if not curve or cpu_s < min(xs) * (1 - 1e-9) or cpu_s > max(xs) * (1 + 1e-9):
        return None
    for lo, hi in zip(curve, curve[1:]):
        if lo.cpu_s <= cpu_s <= hi.cpu_s:
            if hi.cpu_s == lo.cpu_s:
                return lo.accuracy[key]["mean"]
            t = (math.log(cpu_s) - math.log(lo.cpu_s)) / (math.log(hi.cpu_s) - math.log(lo.cpu_s))
            return lo.accuracy[key]["mean"] + t * (hi.accuracy[key]["mean"] - lo.accuracy[key]["mean"])
    return curve[0].accuracy[key]["mean"]  # a curve of one point, read at that point


def comparisons(frontier: dict[str, Any], pts: list[Point]) -> list[dict[str, Any]]:
    """For each point and each other family whose curve covers its CPU time: point - that curve, per accuracy."""
    curves = {f: [p for p in pts if p.family == f] for f in frontier["families"]}
    out = []
    for p in pts:
        for other, curve in curves.items():
            if other == p.family:
                continue
            diffs = {k: read_at(curve, p.cpu_s, k) for k in ACCURACY_KEYS}
            if all(v is not None for v in diffs.values()):
                out.append(
                    {
                        "run": p.run,
                        "family": p.family,
                        "against": other,
                        "cpu_s": p.cpu_s,
                        "minus_other": {k: p.accuracy[k]["mean"] - v for k, v in diffs.items()},
                    }
                )
    return out


def parity(spec: dict[str, Any], pts: list[Point], summary: dict[str, dict]) -> dict[str, Any]:
    """Each point against the baseline seed by seed: each key of within_seed_range at or above the baseline's worst
    seed, each key of max_drop at most that many points below the baseline's mean. A point is at parity when every
    one of its seeds holds and it has as many seeds as the baseline; `cheapest` is the least CPU time at parity."""
    base = summary[BASELINE]
    bounds = {
        **{k: min(base[k]["values"]) for k in spec["within_seed_range"]},
        **{k: base[k]["mean"] - drop for k, drop in spec["max_drop"].items()},
    }
    rows = []
    for p in sorted((p for p in pts if p.run != BASELINE), key=lambda p: p.cpu_s):
        below = {k: [v for v in p.accuracy[k]["values"] if v < bound] for k, bound in bounds.items()}
        below = {k: v for k, v in below.items() if v}
        all_seeds = p.seeds == len(base["cpu_s"]["values"])
        rows.append({"run": p.run, "cpu_s": p.cpu_s, "speedup": p.speedup, "below": below, "all_seeds": all_seeds})
    cheapest = next((r for r in rows if r["all_seeds"] and not r["below"]), None)
    return {"bounds": bounds, "points": rows, "cheapest": cheapest and cheapest["run"]}


def frontier_result(study, summary: dict[str, dict]) -> dict[str, Any] | None:
    """results.json's `frontier`: the points and the comparisons (None when the config has no frontier)."""
    frontier = study.frontier
    if frontier is None:
        return None
    predicted = predicted_cpu(frontier, study.name)
    pts = points(frontier, summary, predicted)
    return {
        **frontier,
        "clock": STEP_COSTS if predicted else "recorded CPU",
        "points": [p.__dict__ for p in pts],
        "comparisons": comparisons(frontier, pts),
        "at_parity": parity(frontier["parity"], pts, summary) if frontier.get("parity") else None,
    }


def frontier_table(result: dict[str, Any]) -> str:
    """Every point with its accuracies, then each against the other families at the same CPU time."""
    keys = ACCURACY_KEYS
    lines = [
        f"frontier: accuracy against pretraining CPU time ({result['clock']}); mean ± half-range over the seeds "
        "each point has; 'vs' = this point minus the other family's curve at the same CPU time (linear in log "
        "time between its two nearest points)",
        "",
        "| family | run | seeds | CPU s | speed-up | " + " | ".join(LABELS[k] for k in keys) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in keys) + " |",
    ]
    for p in result["points"]:
        cells = [f"{p['accuracy'][k]['mean']:.2f} ± {p['accuracy'][k]['half_range']:.2f}" for k in keys]
        lines.append(
            f"| {p['family']} | {p['run']} | {p['seeds']} | {p['cpu_s']:.0f} | {p['speedup']:.2f}x | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "| run | vs family at its CPU time | " + " | ".join(LABELS[k] for k in keys) + " | better |"]
    lines += ["| --- | --- | " + " | ".join("---" for _ in keys) + " | --- |"]
    for c in result["comparisons"]:
        d = c["minus_other"]
        wins = sum(v > 0 for v in d.values())
        better = c["family"] if wins == len(keys) else c["against"] if wins == 0 else f"mixed ({wins} of {len(keys)})"
        lines.append(f"| {c['run']} | {c['against']} | " + " | ".join(f"{d[k]:+.2f}" for k in keys) + f" | {better} |")
    if result.get("at_parity"):
        lines += ["", *parity_lines(result["at_parity"], result["points"])]
    return "\n".join(lines) + "\n"


def parity_lines(at_parity: dict[str, Any], pts: list[dict]) -> list[str]:
    """The bounds, each point's seeds against them (cheapest first), and the cheapest point at parity."""
    bounds, by_run = at_parity["bounds"], {p["run"]: p for p in pts}
    lines = [
        "parity with the baseline on every seed (seed values in seed order): "
        + "; ".join(f"{LABELS[k]} >= {b:.2f}" for k, b in bounds.items()),
        "",
        "| run | CPU s | speed-up | " + " | ".join(LABELS[k] for k in bounds) + " | at parity |",
        "| --- | --- | --- | " + " | ".join("---" for _ in bounds) + " | --- |",
    ]
    for r in at_parity["points"]:
        values = [" / ".join(f"{v:.2f}" for v in by_run[r["run"]]["accuracy"][k]["values"]) for k in bounds]
        if r["below"]:
            verdict = "no, below: " + ", ".join(
                f"{LABELS[k]} {' / '.join(f'{v:.2f}' for v in vs)}" for k, vs in r["below"].items()
            )
        else:
            verdict = "yes" if r["all_seeds"] else "on its seed only (not judged)"
        lines.append(
            f"| {r['run']} | {r['cpu_s']:.0f} | {r['speedup']:.2f}x | " + " | ".join(values) + f" | {verdict} |"
        )
    cheapest = next((r for r in at_parity["points"] if r["run"] == at_parity["cheapest"]), None)
    lines += [
        "",
        f"cheapest at parity on every seed: {cheapest['run']}, {cheapest['cpu_s']:.0f} CPU s, "
        f"{cheapest['speedup']:.2f}x less than the baseline"
        if cheapest
        else "cheapest at parity on every seed: none of the points",
    ]
    return lines


def plot_frontier(result: dict[str, Any], summary: dict[str, dict], path: Path, title: str) -> None:
    """One panel per accuracy, one curve per family (mean over seeds, error bars: seed half-range), the untrained
    encoder's level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ACCURACY_KEYS), figsize=(5 * len(ACCURACY_KEYS), 4.4))
    for ax, key in zip(axes, ACCURACY_KEYS):
        for i, family in enumerate(result["families"]):
            curve = [p for p in result["points"] if p["family"] == family]
            ax.errorbar(
                [p["cpu_s"] for p in curve],
                [p["accuracy"][key]["mean"] for p in curve],
                yerr=[p["accuracy"][key]["half_range"] for p in curve],
                fmt="-o",
                color=f"C{i}",
                capsize=3,
                label=family,
            )
            for p in curve:
                if p["seeds"] > 1:
                    ax.scatter([p["cpu_s"]] * p["seeds"], p["accuracy"][key]["values"], color=f"C{i}", alpha=0.3, s=14)
        if UNTRAINED in summary and key in summary[UNTRAINED]:
            ax.axhline(summary[UNTRAINED][key]["mean"], color="gray", linestyle="--", label="untrained")
        ax.set_xscale("log")
        ax.set_xlabel(f"pretraining CPU time, s ({result['clock']})")
        ax.set_ylabel(f"{LABELS[key]} top-1 (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy against compute (error bars: seed half-range; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
