"""The project's benchmarks and its curriculum study, as one importable package.

Each script here runs as `python benchmarks/<name>.py` and imports the others as `benchmarks.<name>` (the study's
modules as `benchmarks.study.<module>`); run that way, a script's first import is `_checkout`, which puts the
checkout root on sys.path so that this package, and this checkout's own `mae_et`, import. `REPO` is that root, for
every path a benchmark takes from the checkout (recipes, pretrain.py, the published results).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
