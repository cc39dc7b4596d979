"""The study's verdicts: each target of the study config against the summary (speed-up and accuracy bounds per run,
the equal-time comparison, the untrained floor), the baseline's speed against the reference's, and the verdict
lines the report prints. Pure arithmetic on the numbers given (tested on made-up summaries)."""

from __future__ import annotations

from typing import Any

from benchmarks.study.config import ACCURACY_KEYS, BASELINE, EQUAL_TIME_OF, UNTRAINED, Study


def reference_check(study: Study, cfg, device_name: str, baseline_s_per_epoch: float) -> dict[str, Any]:
    """Our baseline's s/epoch vs the reference's; 'n/a' unless model, decoder, batch, crop and device all match."""
    ref = study.reference
    ours = {
        "model": cfg.model.size,
        "patch_size": cfg.model.patch_size,
        "decoder_embed_dim": cfg.model.decoder_embed_dim,
        "decoder_depth": cfg.model.decoder_depth,
        "batch_size": cfg.train.batch_size * cfg.train.accum_steps,
        "crop_size": cfg.data.crop_size,
    }
    differs = [f"{k} {ours[k]} vs {ref[k]}" for k in ours if ours[k] != ref[k]]
    if ref["device"] not in device_name:
        differs.append(f"device {device_name} vs {ref['device']}")
    out = {"ours_s_per_epoch": baseline_s_per_epoch, "reference_s_per_epoch": ref["s_per_epoch"], "differs": differs}
    if differs:
        return {**out, "verdict": "n/a", "ratio": None}
    ratio = baseline_s_per_epoch / ref["s_per_epoch"]
    return {**out, "verdict": "PASS" if ratio <= 1.0 else "FAIL", "ratio": ratio}


def run_verdict(t: dict[str, Any], run: dict[str, dict], base: dict[str, dict], speed: float) -> dict[str, Any]:
    """One run's target `t` (`run_targets`): its speed-up, and each bounded accuracy of its summary `run` against the
    baseline's summary `base` (within_seed_range: the baseline's half-range below its mean; max_drop: points)."""
    allowed = {**{k: base[k]["half_range"] for k in t["within_seed_range"]}, **t["max_drop"]}
    accuracy = {
        k: {
            "run": run[k]["mean"],
            "baseline": base[k]["mean"],
            "allowed_drop": drop,
            "ok": run[k]["mean"] >= base[k]["mean"] - drop,
        }
        for k, drop in allowed.items()
    }
    return {
        "speedup": speed,
        "target_speedup": t["speedup"],
        "accuracy": accuracy,
        "within_seed_range": t["within_seed_range"],
        "max_drop": t["max_drop"],
        "pass": speed >= t["speedup"] and all(a["ok"] for a in accuracy.values()),
    }


def equal_time_verdict(summary: dict[str, dict], equal_run: str, clock: str) -> dict[str, Any]:
    """et's linear probe against that of the run given et's time."""
    et_lin, eq_lin = summary[EQUAL_TIME_OF]["linear_top1"]["mean"], summary[equal_run]["linear_top1"]["mean"]
    return {
        "run": equal_run,
        "et_linear_top1": et_lin,
        "equal_time_linear_top1": eq_lin,
        "time_ratio": summary[equal_run][f"{clock}_s"]["mean"] / summary[EQUAL_TIME_OF][f"{clock}_s"]["mean"],
        "pass": et_lin > eq_lin,
    }


def floor_verdict(summary: dict[str, dict], margin: float) -> dict[str, Any]:
    """Every trained encoder (not an ablation) at least `margin` points above the untrained one on every accuracy."""
    trained = [r for r in summary if r != UNTRAINED and "+" not in r]
    floor = {
        run: {
            k: {
                "run": summary[run][k]["mean"],
                "untrained": summary[UNTRAINED][k]["mean"],
                "ok": summary[run][k]["mean"] >= summary[UNTRAINED][k]["mean"] + margin,
            }
            for k in ACCURACY_KEYS
        }
        for run in trained
    }
    return {
        "margin": margin,
        "runs": floor,
        "pass": all(a["ok"] for per_run in floor.values() for a in per_run.values()),
    }


def verdicts(
    targets: dict[str, Any],
    clock: str,
    summary: dict[str, dict],
    speedup: dict[str, dict],
    reference: dict,
    equal_time_run: str | None = None,
) -> dict[str, Any]:
    """Each target of the study against the summary: pure arithmetic on the numbers given (tested on made-up ones).

    Per run of targets["runs"] (`run_targets`): speed-up >= its target, each accuracy of within_seed_range at or above
    the baseline's worst seed (mean - half-range), each of max_drop at most that many points below the baseline's mean;
    equal time (equal_time_run: the run given et's time): et's linear probe above that run's;
    floor: every trained encoder at least targets["min_gain_over_untrained"] points above the untrained one on every
    accuracy. {"clock", "runs": {row: ...}, "equal_time"?, "floor"?, "reference"}.
    """
    out: dict[str, Any] = {"clock": clock, "runs": {}, "reference": reference}
    for row, t in targets["runs"].items():
        if row in summary and row in speedup:
            out["runs"][row] = run_verdict(t, summary[row], summary[BASELINE], speedup[row][clock]["mean"])
    if equal_time_run in summary and EQUAL_TIME_OF in summary:
        out["equal_time"] = equal_time_verdict(summary, equal_time_run, clock)
    if UNTRAINED in summary:
        out["floor"] = floor_verdict(summary, float(targets.get("min_gain_over_untrained", 0.0)))
    return out


# ----------------------------------------------------------------------------- the verdict lines


def _word(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _accuracy_text(a: dict) -> str:
    return "; ".join(
        f"{k} {x['run']:.2f} vs {x['baseline']:.2f} (-{x['allowed_drop']:.2f} allowed) {'ok' if x['ok'] else 'below'}"
        for k, x in a.items()
    )


def _bounds_text(t: dict) -> str:
    parts = (
        [f"{', '.join(t['within_seed_range'])} within the baseline's seed range or above"]
        if t["within_seed_range"]
        else []
    )
    parts += [f"{k} within {d:g} point{'s' if d != 1 else ''}" for k, d in t["max_drop"].items()]
    return "; ".join(parts)


def _floor_line(floor: dict[str, Any]) -> str:
    below = [
        f"{run} {k} {a['run']:.2f} vs {a['untrained']:.2f}"
        for run, per_run in floor["runs"].items()
        for k, a in per_run.items()
        if not a["ok"]
    ]
    return (
        f"verdict trained vs untrained (every accuracy >= untrained + {floor['margin']:g} points): "
        f"{_word(floor['pass'])}" + (f" - below: {'; '.join(below)}" if below else "")
    )


def verdict_lines(v: dict[str, Any]) -> list[str]:
    ref, clock = v["reference"], v["clock"]
    ref_detail = f"ours {ref['ours_s_per_epoch']:.2f} s/epoch vs reference {ref['reference_s_per_epoch']} s/epoch" + (
        f" ({'; '.join(ref['differs'])})" if ref["differs"] else f" (x{ref['ratio']:.2f})"
    )
    lines = [
        f"verdict {row} (>= {t['target_speedup']:g}x less {clock} time; {_bounds_text(t)}): {_word(t['pass'])} - "
        f"speed-up {t['speedup']:.3f}x; {_accuracy_text(t['accuracy'])}"
        for row, t in v["runs"].items()
    ]
    if "equal_time" in v:
        eq = v["equal_time"]
        lines.append(
            f"verdict equal {clock} time (curriculum ahead on linear probe): {_word(eq['pass'])} - et "
            f"{eq['et_linear_top1']:.2f} vs {eq['run']} {eq['equal_time_linear_top1']:.2f} (its {clock} time "
            f"{eq['time_ratio']:.2f}x et's)"
        )
    if "floor" in v:
        lines.append(_floor_line(v["floor"]))
    lines.append(f"verdict baseline s/epoch vs reference: {ref['verdict']} - {ref_detail}")
    return lines
