"""The claim, measured: MAE with the EfficientTrain curriculum vs plain MAE, in time and accuracy.

    python benchmarks/curriculum_vs_baseline.py --study configs/study/<name>.yaml \
        [--data /data/imagenette] [--out DIR] [--seeds 0 1] [--launch auto|subprocess|inprocess] \
        [--ablations all [--ablation-seeds 0]] [--pretrain-only | --eval-only | --report-only] [--publish]

The study itself (what it runs, measures and writes: `--help`, or benchmarks/study/__init__.py) lives in the
package benchmarks/study/, one module per job:
  config      the study config read into a Study: runs, ablations, targets, the study's own row names
  paths       paths and commands recorded relative to the checkout; the study folder and its published copy
  state       state.json (what is done, keyed by its settings), settings keys, the study folder's role locks
  clocks      the machine and commit of a run, the stopwatch, the training and quiet-CPU clocks
  runs        one pretraining: its overrides, plan and FLOPs, launch, read-back, the untrained encoder, warm-up
  evaluation  one encoder: features, kNN (at each test size), the cached-feature probe, the fine-tune; --recheck
  flow        one process's part, row by row and seed by seed, each finished step read back
  summary     mean and spread over seeds, speed-ups, ablation effects, machine and code notes
  verdicts    the study's targets against the summary, the reference check, the verdict lines
  tables      the markdown tables and the per-size speed against the FLOP ratio
  plot        accuracy against pretraining time
  report      results.json and table.md assembled, written, printed, published; the report rebuilt from a state
  cli         this command line and the top-level flow
"""

from __future__ import annotations

if not __package__:  # run as `python benchmarks/curriculum_vs_baseline.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

from benchmarks.study.cli import main, run_command

__all__ = ["main"]

if __name__ == "__main__":
    run_command()
