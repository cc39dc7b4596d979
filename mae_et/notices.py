"""What a person sees besides the log lines: one-line warnings, and progress on long work.

`one_line_warnings()` (run when `mae_et` is imported) prints our warnings as `warning: <message>`, without the
source line of the call; they stay ordinary warnings for filters and `pytest.warns`. `progress` is a tqdm bar on a
terminal and a plain line at every tenth of the work in a log, on the main process only (docs/design.md, "Warnings
and progress").
"""

from __future__ import annotations

import sys
import time
import warnings


class MaeEtWarning(UserWarning):
    """Every warning mae_et gives."""


class DataWarning(MaeEtWarning):
    """A file skipped (named, with the reason) or a data folder that looks wrong."""


class RunWarning(MaeEtWarning):
    """Something about the run: a checkpoint passed over, a tracker missing, a setting ignored."""


def one_line_warnings() -> None:
    python_format = warnings.formatwarning
    if getattr(python_format, "mae_et_one_line", False):
        return  # already installed

    def format_warning(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, MaeEtWarning):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    format_warning.mae_et_one_line = True
    warnings.formatwarning = format_warning


class _PlainLines:
    """Progress as a plain line at every tenth of the work (a log, where a bar's carriage returns would pile up),
    with a tqdm bar's `update` / `close` / iteration."""

    def __init__(self, iterable, total: int | None, initial: int, desc: str, unit: str) -> None:
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.t0 = time.perf_counter()
        self.next_tenth = (10 * initial // total + 1) if total else 11

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total and 10 * self.n >= self.next_tenth * self.total:
            self.next_tenth = 10 * self.n // self.total + 1
            seconds = time.perf_counter() - self.t0
            # stdout, the log lines' stream: their order kept, none written over (docs/design.md)
            print(
                f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%, {seconds:.0f}s)",
                file=sys.stdout,
                flush=True,
            )

    def close(self) -> None:
        pass


class _Silent(_PlainLines):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(
    iterable=None, *, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True
):
    """A tqdm bar on a terminal; plain lines at every tenth when stderr is not one; nothing when not `enabled`
    (ranks other than the main one)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not enabled:
        return _Silent(iterable, total, initial, desc, unit)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm  # installed with timm's dependencies

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return _PlainLines(iterable, total, initial, desc, unit)
