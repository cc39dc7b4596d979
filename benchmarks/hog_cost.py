"""What the HOG target (model.target=hog) costs per training step, on this CPU.

    python benchmarks/hog_cost.py --out benchmarks/results/hog_cost

The training loop's step with the pixel target, the same step with the HOG target, and the HOG target alone on the
step's normalised batch alternate in rotating rounds (peer_cpu.py's harness, rows and settings); medians of CPU and
wall time per step. The figures: HOG target / HOG step (at most 5%) and HOG step / pixel step. Writes
<out>/hog_cost.json and hog_cost.md.
"""

from __future__ import annotations

if not __package__:  # run as `python benchmarks/hog_cost.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks import peer_cpu
from benchmarks.peer_cpu import ROWS, RowSpec, TimedSteps, alternate, random_images, run_cli  # noqa: F401 (ROWS: the same rows)
from benchmarks.throughput import fresh_accelerator
from mae_et.cli import run_user_command
from mae_et.data.folder import normalize_on_device
from mae_et.train.step import build_training

MAX_TARGET_SHARE = 0.05  # the HOG target at most 5% of the step
CONTENDERS = ("pixel_step", "hog_step", "hog_target")


def row_config(row: RowSpec, target: str):
    """peer_cpu.py's row, every patch decoded, with this target (norm-pix for pixels)."""
    norm_pix = "true" if target == "pixel" else "false"
    return peer_cpu.row_config(row, 1.0, f"model.target={target}", f"model.norm_pix_loss={norm_pix}")


class Contender(TimedSteps):
    """The pixel step, the HOG step, or the HOG target alone on the step's normalised batch."""

    def __init__(self, name: str, row: RowSpec):
        self.name, self.row = name, row
        images = random_images(row)  # (n, 3, S, S) uint8
        _, _, step = build_training(
            row_config(row, "pixel" if name == "pixel_step" else "hog"), fresh_accelerator("fp32"), 1e-4, (row.img,)
        )
        if name == "hog_target":
            hog = step.accelerator.unwrap_model(step.model).hog
            pixels = normalize_on_device(images)  # (n, 3, S, S) float: what the step's loss sees
            self.run = lambda noise: hog(pixels)
        else:
            self.run = lambda noise: step(images, row.img, noise)


def bench_row(row: RowSpec, rounds: int, warmup: int) -> dict:
    runs, order_log, med = alternate([Contender(name, row) for name in CONTENDERS], row, rounds, warmup)
    ratios = {
        clock: {
            "hog_target_over_hog_step": med["hog_target"][clock] / med["hog_step"][clock],
            "hog_step_over_pixel_step": med["hog_step"][clock] / med["pixel_step"][clock],
        }
        for clock in ("cpu_s", "wall_s")
    }
    return {"row": row.__dict__, "rounds": rounds, "order": order_log, "runs": runs, "median": med, "ratios": ratios}


def verdicts(rows: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in rows.items():
        share = r["ratios"]["cpu_s"]["hog_target_over_hog_step"]
        lines.append(
            f"{name}: the HOG target is {100 * share:.2f}% of the HOG step's CPU time (target <= "
            f"{100 * MAX_TARGET_SHARE:.0f}%): {'PASS' if share <= MAX_TARGET_SHARE else 'FAIL'}; HOG step / pixel step "
            f"{r['ratios']['cpu_s']['hog_step_over_pixel_step']:.3f}"
        )
    return lines


def markdown(result: dict) -> str:
    lines = [
        f"HOG target cost, {result['device']}, {result['threads']} thread(s), torch {result['torch']}; medians of "
        f"{result['rounds']} alternating rounds; per training step (fp32, fused AdamW, grad clip 1.0)",
        "",
        "| row | batch | pixel step CPU s | HOG step CPU s | HOG target CPU s | target / HOG step | HOG / pixel step | "
        "(wall) target / HOG step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["rows"].items():
        m, q = r["median"], r["ratios"]
        lines.append(
            f"| {name} | {r['row']['batch']} | {m['pixel_step']['cpu_s']:.3f} | {m['hog_step']['cpu_s']:.3f} | "
            f"{m['hog_target']['cpu_s']:.4f} | {100 * q['cpu_s']['hog_target_over_hog_step']:.2f}% | "
            f"{q['cpu_s']['hog_step_over_pixel_step']:.3f} | {100 * q['wall_s']['hog_target_over_hog_step']:.2f}% |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in result["verdicts"]) + "\n"


def main(argv=None) -> dict:
    return run_cli(argv, __doc__, "hog_cost", bench_row, verdicts, markdown, {"max_target_share": MAX_TARGET_SHARE})


if __name__ == "__main__":
    run_user_command(main)
