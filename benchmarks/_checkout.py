"""Makes a benchmark script runnable as `python benchmarks/<name>.py`: puts the checkout root first on sys.path.

Run that way, Python puts the script's folder (benchmarks/) on sys.path, not the checkout root, so neither the
`benchmarks` package nor this checkout's `mae_et` would import (an installed copy of mae_et, e.g. an editable one
of another checkout, would be found instead). Every entry script imports this module first, and only when it is
run as a script (imported as `benchmarks.<name>`, the root is on sys.path already):

    if not __package__:  # run as `python benchmarks/<name>.py`: see benchmarks/_checkout.py
        import _checkout  # noqa: F401

The only place a benchmark touches sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if sys.path[:1] != [ROOT]:  # first, ahead of any installed copy of mae_et
    sys.path.insert(0, ROOT)
