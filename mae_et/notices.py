"""What a person sees besides the log lines: warnings they can read, and progress on long work.

Progress (`progress`): a tqdm bar on a terminal (stderr), a plain line at every tenth of the work in a log
file (on stdout, in order with the log lines), on the main process only; used by the decode-once store, feature
extraction (kNN, cached probe), the fine-tune and probe epochs and the pretraining loop.

Warnings: one line that says what and why, not the source line of the call.

Python prints a warning as `file.py:347: UserWarning: <message>` followed by the source line of the
`warnings.warn(...)` call, which tells a user nothing. Our warnings are of the categories below, and
`one_line_warnings()` (run when `mae_et` is imported, so DataLoader workers get it too) prints just
`warning: <message>` for them; every other library's warnings keep Python's format. They are still
ordinary warnings: filters, `-W error` and `pytest.warns` see them as usual.
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
    """Progress as a plain line at every tenth of the work (for logs, pipes and files, where a bar's carriage
    returns would pile up), with the same `update` / `close` / iteration as a tqdm bar."""

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
            # stdout, the stream the log lines go to: one stream keeps their order, and a log file that gets
            # stdout and stderr through two descriptors (`> log 2> log`, a scheduler's --output and --error
            # naming one file) would have one stream's lines written over the other's
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
