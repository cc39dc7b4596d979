"""The report's figure: accuracy against pretraining time, one panel per accuracy, every run with its seeds, the
untrained floor, and optionally another edition's runs beside them."""

from __future__ import annotations

from pathlib import Path

from benchmarks.study.config import UNTRAINED

PANELS = (
    ("knn_top1_cls", "kNN top-1, cls, k=20"),
    ("linear_top1", "linear probe top-1"),
    ("finetune_top1", "fine-tune top-1"),
)


def _draw_runs(ax, results: dict[str, dict], summary: dict[str, dict], key: str, time_key: str) -> None:
    """Each trained run (not an ablation): its seeds as light dots, its mean ± half-range as a marker."""
    for i, run in enumerate(r for r in results if r != UNTRAINED and "+" not in r):
        color, seeds = f"C{i}", results[run]
        ax.scatter([seeds[s][time_key] for s in seeds], [seeds[s][key] for s in seeds], color=color, alpha=0.35, s=18)
        t, a = summary[run][time_key], summary[run][key]
        ax.errorbar(
            t["mean"], a["mean"], xerr=t["half_range"], yerr=a["half_range"], fmt="o", color=color, capsize=3, label=run
        )


def _draw_compare(ax, compare: tuple[str, dict[str, dict]], key: str, time_key: str) -> None:
    """Another edition's runs: hollow grey-edged markers, their times from their own sessions."""
    label_of, other = compare
    for j, (run, s) in enumerate((r, s) for r, s in other.items() if r != UNTRAINED and "+" not in r):
        if time_key in s and key in s:
            ax.errorbar(
                s[time_key]["mean"],
                s[key]["mean"],
                xerr=s[time_key]["half_range"],
                yerr=s[key]["half_range"],
                fmt="D",
                mfc="none",
                color=f"C{j}",
                alpha=0.6,
                capsize=2,
                label=f"{label_of}: {run}",
            )


def plot(
    results: dict[str, dict],
    summary: dict[str, dict],
    clock: str,
    path: Path,
    title: str,
    compare: tuple[str, dict[str, dict]] | None = None,
) -> None:
    """Accuracy vs pretraining time per run (seeds as light dots, mean ± half-range); compare = (label, summary of
    another edition): its runs as hollow grey-edged markers, their times from their own sessions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    time_key = f"{clock}_s"
    for ax, (key, label) in zip(axes, PANELS):
        _draw_runs(ax, results, summary, key, time_key)
        if compare is not None:
            _draw_compare(ax, compare, key, time_key)
        if UNTRAINED in summary:  # the floor: the same encoder at E = 0
            ax.axhline(summary[UNTRAINED][key]["mean"], color="gray", linestyle="--", label="untrained (E = 0)")
        ax.set_xlabel(f"pretraining {'CPU' if clock == 'cpu' else 'wall'} time (s)")
        ax.set_ylabel(f"{label} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: accuracy vs pretraining {clock} time (seeds: light dots; mean ± half-range)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
