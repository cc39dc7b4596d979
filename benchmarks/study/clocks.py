"""Where and how long: the machine a run or evaluation ran on, the commit that did it, and the clocks that time it
(a block's wall and CPU seconds, a run's training clock from its metrics.jsonl, and the quiet-CPU clock that other
work on a shared machine cannot inflate)."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import REPO
from benchmarks.study.paths import in_repo
from mae_et.run.tracking import METRICS_FILE

QUIET_QUANTILE = 0.1  # quiet_cpu_seconds: the window of each stage that 90% of its windows are slower than


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores)"


def machine() -> dict[str, Any]:
    """Where a run ran: the device, and the host (a resumed study may continue on another one)."""
    return {"device": device_name(), "host": platform.node(), "torch": torch.__version__}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def code_version() -> dict[str, Any] | None:
    """The commit of this checkout, and whether its tracked files differ from it (numerics such as the mask
    stream changed between commits, so a run records the code that trained it); None outside a git checkout."""
    try:
        return {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.CalledProcessError):
        return None


class Stopwatch:
    """Wall and process CPU seconds of a block: `with Stopwatch() as sw: ...; sw.wall, sw.cpu`."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def training_clock(record: dict[str, Any]) -> tuple[float, float]:
    """(wall, CPU) seconds of training up to a metrics.jsonl record: the loop less its bookkeeping."""
    return (
        record["elapsed_s"] - record.get("overhead_s", 0.0),
        record.get("cpu_s", math.nan) - record.get("overhead_cpu_s", 0.0),
    )


def quiet_cpu_seconds(records: list[dict[str, Any]], quantile: float = QUIET_QUANTILE) -> float:
    """The run's CPU time on a quiet machine: per curriculum stage, the `quantile` of its logged windows' CPU seconds
    per step (the stage's first window, which holds its one-time start, left out), times the stage's steps.

    Other work on this 2-vCPU host only ever slows a window (a neighbouring test run doubled the study's CPU seconds
    per step), and it covered more than half of some runs, which moves even the median; the fastest decile is what
    the run costs when left alone. Reported beside the CPU clock, which stays the verdicts' clock."""
    per_size: dict[int, list[tuple[int, float]]] = {}
    prev_step, prev_cpu = 0, 0.0
    for r in records:
        cpu = training_clock(r)[1]
        if r["step"] > prev_step:
            per_size.setdefault(r["size"], []).append(
                (r["step"] - prev_step, (cpu - prev_cpu) / (r["step"] - prev_step))
            )
        prev_step, prev_cpu = r["step"], cpu
    total = 0.0
    for windows in per_size.values():
        rates = sorted(rate for _, rate in (windows[1:] or windows))
        total += sum(steps for steps, _ in windows) * rates[int(quantile * (len(rates) - 1))]
    return total


def backfill_quiet_cpu(record: dict[str, Any]) -> dict[str, Any]:
    """A record written before quiet_cpu_s existed (the second edition's training commit): computed from its run
    folder's metrics.jsonl when the folder is here; otherwise the record as it is."""
    if "quiet_cpu_s" not in record and (in_repo(record["run_dir"]) / METRICS_FILE).is_file():
        lines = (in_repo(record["run_dir"]) / METRICS_FILE).read_text().splitlines()
        record = {**record, "quiet_cpu_s": quiet_cpu_seconds([json.loads(x) for x in lines if x.strip()])}
    return record
