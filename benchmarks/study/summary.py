"""The numbers over seeds: mean and spread of every per-seed number, the speed-ups (each within one seed), each
ablation beside the run it changes, and the notes on which machines and which commits the runs came from."""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.study.config import ACCURACY_KEYS, BASELINE, CLOCKS, SUMMARY_KEYS, run_name, split_row


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and spread over seeds: half-range ((max - min) / 2) and the sample std."""
    return {
        "mean": statistics.fmean(values),
        "half_range": (max(values) - min(values)) / 2,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def summarise(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of every number the seeds all have (the untrained row has no loss)."""
    seeds = sorted(per_seed, key=int)
    by_size = sorted({k for s in seeds for k in per_seed[s] if k.startswith("knn_top1_") and "_at" in k})
    keys = [k for k in (*SUMMARY_KEYS, *by_size) if all(isinstance(per_seed[s].get(k), (int, float)) for s in seeds)]
    return {key: spread([per_seed[s][key] for s in seeds]) for key in keys}


def speedups(results: dict[str, dict[str, dict]], runs: list[str]) -> dict[str, dict[str, Any]]:
    """{run: {clock: spread of baseline time / run time}}, each ratio within one seed (one machine, one hour)."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        seeds = sorted(results[run], key=int)
        out[run] = {
            clock: spread([results[BASELINE][s][f"{clock}_s"] / results[run][s][f"{clock}_s"] for s in seeds])
            for clock in CLOCKS
        }
        if all("quiet_cpu_s" in results[r][s] for r in (BASELINE, run) for s in seeds):  # see quiet_cpu_seconds
            out[run]["quiet_cpu"] = spread(
                [results[BASELINE][s]["quiet_cpu_s"] / results[run][s]["quiet_cpu_s"] for s in seeds]
            )
    return out


def ablation_effects(results: dict[str, dict[str, dict]], ablation_rows: list[str]) -> dict[str, dict[str, Any]]:
    """Each ablation row beside the run it changes, on the ablation's own seeds: per seed, ablation - run for
    every accuracy and run time / ablation time on each clock, then mean and spread over those seeds (an
    ablation measured on fewer seeds than the study is compared with the same seeds of its run, not their mean)."""
    out: dict[str, dict[str, Any]] = {}
    for row in ablation_rows:
        run, seeds = split_row(row)[0], sorted(results[row], key=int)
        if not seeds:
            continue
        out[row] = {
            "run": run,
            "seeds": [int(s) for s in seeds],
            "minus_run": {
                key: spread([results[row][s][key] - results[run][s][key] for s in seeds])
                for key in ACCURACY_KEYS
                if all(key in results[row][s] for s in seeds)
            },
            "time_ratio": {
                clock: spread([results[run][s][f"{clock}_s"] / results[row][s][f"{clock}_s"] for s in seeds])
                for clock in CLOCKS
            },
            # the plan's own ratio: an ablation trained in another session than its run carries the
            # machine's drift in its time ratio, not in this one
            "flop_ratio": spread([results[run][s]["pflop"] / results[row][s]["pflop"] for s in seeds]),
        }
    return out


def machines_note(results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Which machine each seed ran on; a seed spread over several machines, or seeds on different ones, are named."""
    by_seed: dict[str, set] = {}
    for run in results:
        for seed, r in results[run].items():
            if "machine" in r:
                by_seed.setdefault(seed, set()).add((r["machine"]["device"], r["machine"]["host"]))
    notes = [
        f"seed {s}'s runs ran on {len(m)} machines ({'; '.join(f'{d} on {h}' for d, h in sorted(m))}): its speed-ups "
        "mix machines"
        for s, m in sorted(by_seed.items())
        if len(m) > 1
    ]
    distinct = {m for ms in by_seed.values() for m in ms}
    if len(by_seed) > 1 and len(distinct) > 1 and not notes:
        notes.append(
            "the seeds ran on different machines ("
            + "; ".join(f"seed {s}: {d} on {h}" for s, ms in sorted(by_seed.items()) for d, h in sorted(ms))
            + "): each speed-up is "
            "within one seed, the times are not comparable across seeds"
        )
    return {
        "by_seed": {s: [{"device": d, "host": h} for d, h in sorted(m)] for s, m in by_seed.items()},
        "notes": notes,
    }


def code_note(results: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Which code trained each run (runs from before this was recorded have none); more than one commit is named."""
    by_commit: dict[str, list[str]] = {}
    for row in results:
        for seed, r in sorted(results[row].items()):
            code = r.get("code")
            if code:
                label = code["commit"][:10] + (" with changes" if code["dirty"] else "")
                by_commit.setdefault(label, []).append(run_name(row, int(seed)))
    notes = []
    if len(by_commit) > 1:
        notes.append(
            "the runs were trained by "
            + str(len(by_commit))
            + " code versions ("
            + "; ".join(f"{c}: {', '.join(names)}" for c, names in sorted(by_commit.items()))
            + ")"
        )
    return {"by_commit": by_commit, "notes": notes}
