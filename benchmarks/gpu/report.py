"""The run's clock and record: what is left of the budget, each item guarded (an error or an overrun is recorded
and the run goes on), and every row, skip and failure rewritten to gpu_check.json and gpu_check.md after each."""

from __future__ import annotations

import gc
import json
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.gpu.tables import markdown


class OutOfTime(BaseException):
    """Raised (by SIGALRM) inside an item that ran past its limit. BaseException: no `except Exception` swallows it."""


class Report:
    """Every row, skip and failure of the run, rewritten to JSON and Markdown after each change."""

    def __init__(self, out: Path, budget_s: float, header: dict, t0: float | None = None) -> None:
        self.out = out
        self.t0 = time.perf_counter() if t0 is None else t0
        self.budget_s = budget_s
        self.data = {
            **header,
            "budget_s": budget_s,
            "elapsed_s": 0.0,
            "step": [],
            "ratios": [],
            "size_speedups": [],
            "e2e": [],
            "hog": [],
            "fractal": [],
            "probe": None,
            "skipped": [],
            "failed": [],
            "targets": [],
        }
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def fits(self, section: str, item: str, estimate_s: float, reserve_s: float = 0.0) -> bool:
        """True when `estimate_s` fits in what is left after `reserve_s` (kept for later sections); else a skip."""
        if estimate_s <= self.left() - reserve_s:
            return True
        self.skip(
            section,
            item,
            f"needs about {estimate_s:.0f} s; {max(self.left(), 0):.0f} s of the "
            f"{self.budget_s:.0f} s budget left, {reserve_s:.0f} s of it kept for later sections",
        )
        return False

    @contextmanager
    def guard(self, section: str, item: str, limit_s: float | None = None):
        """Run one item: an error is recorded and the run goes on; past `limit_s` (default: what is left of
        the budget) it is stopped by SIGALRM and recorded as failed, so the run ends near its budget."""
        limit = max(self.left() if limit_s is None else min(limit_s, self.left()), 1.0)
        armed = {"on": True}

        def on_alarm(signum, frame):
            if armed["on"]:
                raise OutOfTime(f"stopped after {limit:.0f} s: past its share of the {self.budget_s:.0f} s budget")

        use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        if use_alarm:
            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        except (Exception, OutOfTime) as e:  # noqa: BLE001 - one item's failure must not cost the others
            self.fail(section, item, e)
            free_memory()
        finally:
            armed["on"] = False
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    def skip(self, section: str, item: str, reason: str) -> None:
        print(f"SKIP {section} {item}: {reason}", flush=True)
        self.data["skipped"].append({"section": section, "item": item, "reason": reason})
        self.save()

    def fail(self, section: str, item: str, error: BaseException) -> None:
        print(f"FAILED {section} {item}: {type(error).__name__}: {error}", flush=True)
        if not isinstance(error, OutOfTime):
            traceback.print_exc()
        self.data["failed"].append(
            {"section": section, "item": item, "error": f"{type(error).__name__}: {error}"[:2000]}
        )
        self.save()

    def add(self, section: str, row) -> None:
        if isinstance(self.data[section], list):
            self.data[section].append(row)
        else:
            self.data[section] = row
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.data))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
