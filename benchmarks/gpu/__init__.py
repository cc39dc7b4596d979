"""The parts of benchmarks/gpu_check.py, one job each: plan (what a run measures), report (the budget's clock and
the record it rewrites), tables (Markdown and targets), steps (the step rows), sections (the sections after them)."""
