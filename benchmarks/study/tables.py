"""The report's markdown tables: the main table (time, speed-ups, loss and accuracies per row), the ablations beside
their runs, kNN across test sizes, and the measured speed of each input size against its FLOP ratio (with the
per-size rates it is made from, which results.json records too)."""

from __future__ import annotations

from typing import Any

from benchmarks.study.config import ACCURACY_KEYS
from benchmarks.study.runs import image_flops


def _cell(stat: dict | None, digits: int = 2) -> str:
    return "-" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['half_range']:.{digits}f}"


def _ratio(speedup: dict[str, dict], run: str, clock: str) -> str:
    return _cell(speedup[run][clock], 2) + "x" if clock in speedup.get(run, {}) else "-"


def markdown_table(summary: dict[str, dict], speedup: dict[str, dict], seeds: list[int]) -> str:
    lines = [
        f"mean ± half-range over seeds {', '.join(map(str, seeds))}; speed-up = baseline time / run time within each "
        "seed; times are the training loop's (wall, and process CPU = user + system); quiet CPU: each stage's "
        "fastest-decile window of CPU seconds per step times its steps (what other work cannot inflate)",
        "",
        "| run | epochs | steps | wall s | CPU s | speed-up (wall) | speed-up (CPU) | speed-up (quiet CPU) | final "
        "loss | "
        "kNN cls | kNN mean | linear | fine-tune |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in [r for r in summary if "+" not in r]:  # the runs, then the untrained row (ablations: their own table)
        s = summary[run]
        lines.append(
            f"| {run} | {_cell(s['epochs'], 2)} | {_cell(s['steps'], 0)} | {_cell(s['wall_s'], 1)} | "
            f"{_cell(s['cpu_s'], 1)} | {_ratio(speedup, run, 'wall')} | {_ratio(speedup, run, 'cpu')} | "
            f"{_ratio(speedup, run, 'quiet_cpu')} | {_cell(s.get('final_loss'), 4)} | "
            f"{_cell(s['knn_top1_cls'], 2)} | {_cell(s['knn_top1_mean'], 2)} | {_cell(s['linear_top1'], 2)} | "
            f"{_cell(s['finetune_top1'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def ablation_table(summary: dict[str, dict], speedup: dict[str, dict], effects: dict[str, dict], clock: str) -> str:
    """The ablation rows, each accuracy beside its difference from the run it changes (same seeds)."""
    lines = [
        f"ablations: each value, then (ablation - its run) on the same seeds; time on the {clock} clock; "
        "time ratios between runs of different sessions carry the machine's drift, the FLOP ratio is the plan's",
        "",
        f"| row | seeds | {clock} s | speed-up vs baseline | its run's time / its time | its run's FLOPs / its "
        "FLOPs | kNN cls | kNN mean | linear | fine-tune |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, e in effects.items():
        s = summary[row]
        accuracies = [
            f"{s[k]['mean']:.2f} ({e['minus_run'][k]['mean']:+.2f})" if k in e["minus_run"] else "-"
            for k in ACCURACY_KEYS
        ]
        lines.append(
            f"| {row} | {', '.join(map(str, e['seeds']))} | {s[f'{clock}_s']['mean']:.1f} | "
            f"{speedup[row][clock]['mean']:.2f}x | {e['time_ratio'][clock]['mean']:.2f}x | "
            f"{e['flop_ratio']['mean']:.3f}x | " + " | ".join(accuracies) + " |"
        )
    return "\n".join(lines) + "\n"


def size_table(summary: dict[str, dict], sizes: list[int], train_size: int) -> str:
    """kNN top-1 (cls / mean) of every encoder at each test size, mean ± half-range over seeds."""
    head = " | ".join(f"{b} px{' (train)' if b == train_size else ''} cls | {b} px mean" for b in sizes)
    lines = [
        f"kNN top-1 across test sizes (trained at {train_size} px; positions as each encoder's pos_embed mode gives "
        "them; train bank and val queries at the test size)",
        "",
        f"| run | {head} |",
        "| --- |" + " --- | --- |" * len(sizes),
    ]
    for run, s in summary.items():
        if "+" in run:
            continue
        cells = " | ".join(
            f"{_cell(s.get(f'knn_top1_cls_at{b}'))} | {_cell(s.get(f'knn_top1_mean_at{b}'))}" for b in sizes
        )
        lines.append(f"| {run} | {cells} |")
    return "\n".join(lines) + "\n"


def share_kind(r: dict[str, Any]) -> tuple[float, str]:
    """(decoded share, what it is a share of) of a run record; a share of 1 decodes every masked patch under
    either rule. Records of the first edition: every masked patch; those before model.decode_fraction_of: stage."""
    share = float(r.get("decode_fraction", 1.0))
    return share, "stage" if share >= 1.0 else r.get("decode_fraction_of", "stage")


def share_label(share: float, of: str) -> str:
    return f"{share:g}" if of == "stage" else f"{share:g} of {of}"


def trained_images(results: dict[str, dict[str, dict]], clock: str) -> dict[tuple[float, str, str, int], list[float]]:
    """{(decoded share, share of, target, B): [images, seconds on the clock]} over every run and seed that trained
    so."""
    key = "seconds" if clock == "wall" else "cpu_seconds"
    totals: dict[tuple[float, str, str, int], list[float]] = {}
    for seeds in results.values():
        for r in seeds.values():
            # records of the first edition: every masked patch, pixels
            kind = (*share_kind(r), r.get("target", "pixel"))
            for st in r.get("stages", []):
                t = totals.setdefault((*kind, st["size"]), [0.0, 0.0])
                t[0] += st["steps"] * r["global_batch"]
                t[1] += st[key]
    return totals


def stage_rates(results: dict[str, dict[str, dict]], cfg, clock: str) -> list[dict[str, Any]]:
    """Per decoder share, target and input size B, over every run and seed that trained so: images per second on the
    clock, against the full size's at the same share and target, beside the ratio of FLOPs per image (the decoder
    tokens really decoded, the head's width). Where the measured gain falls short of the FLOP ratio, the small sizes
    run less efficiently on this device (launch overhead, small matrices): the diagnosis of a speed-up below plan,
    measured rather than assumed."""
    totals = trained_images(results, clock)
    out = []
    for share, of, target, b in sorted(totals, key=lambda k: (-k[0], k[1] != "stage", k[1], k[2], k[3])):
        full = max(size for sh, o, tg, size in totals if (sh, o, tg) == (share, of, target))
        n, t = totals[(share, of, target, b)]
        rate, full_rate = n / t, totals[(share, of, target, full)][0] / totals[(share, of, target, full)][1]
        flops_b, flops_full = (image_flops(cfg, size, share, target, of) for size in (b, full))
        row = {"decode_fraction": share}
        if of != "stage":  # only then: the earlier editions' rows stay as they were published
            row["decode_fraction_of"] = of
        row.update(
            {
                "target": target,
                "size": b,
                "images": n,
                "seconds": t,
                "images_per_s": rate,
                "gain": rate / full_rate,
                "flop_ratio": flops_full / flops_b,
                "efficiency": rate / full_rate / (flops_full / flops_b),
                "gflop_per_image": flops_b / 1e9,
            }
        )
        out.append(row)
    return out


def stage_rate_table(rates: list[dict[str, Any]], clock: str) -> str:
    lines = [
        f"per decoder share, target and input size B, all runs and seeds ({clock} clock): measured speed vs the FLOP "
        "ratio",
        "",
        "| decoded share | target | B | GFLOP / image | images | img / s | gain vs full size | FLOP ratio | "
        "gain / FLOP ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rates:
        lines.append(
            f"| {share_label(r.get('decode_fraction', 1.0), r.get('decode_fraction_of', 'stage'))} | "
            f"{r.get('target', 'pixel')} | {r['size']} | "
            f"{r['gflop_per_image']:.3f} | {r['images']:.0f} | "
            f"{r['images_per_s']:.1f} | {r['gain']:.2f}x | {r['flop_ratio']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(lines) + "\n"
