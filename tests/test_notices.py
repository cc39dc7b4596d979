"""What a person sees: one-line warnings and progress (a bar on a terminal, plain lines in a log)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

from mae_et.notices import progress

SHOW = """
import sys, warnings
from mae_et.notices import DataWarning, progress
warnings.warn("skipping 'a.jpg': zero-byte file", DataWarning)
warnings.warn("someone else's warning", UserWarning)
for _ in progress(range(40), desc="decode once", unit="img"):
    pass
for _ in progress(range(40), desc="hidden", enabled=False):
    pass
"""


def test_our_warnings_are_one_line_others_keep_pythons_format_and_progress_is_plain_lines_in_a_log():
    proc = subprocess.run([sys.executable, "-c", SHOW], cwd=REPO, capture_output=True, text=True)  # stderr: a pipe
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "warning: skipping 'a.jpg': zero-byte file" in lines
    assert not any("DataWarning" in line or "warnings.warn(" in line and "a.jpg" in line for line in lines)
    assert any("UserWarning: someone else's warning" in line for line in lines)  # not ours: untouched
    progress_lines = [line for line in proc.stdout.splitlines() if line.startswith("decode once:")]
    assert not any(line.startswith("decode once:") for line in lines)  # on stdout, with the log lines
    assert progress_lines[0].startswith("decode once: 4/40 img (10%") and progress_lines[-1].startswith(
        "decode once: 40/40"
    )
    assert len(progress_lines) == 10 and "\r" not in proc.stdout
    assert not any(line.startswith("hidden") for line in lines + proc.stdout.splitlines())  # other ranks show nothing


def test_progress_counts_updates_and_starts_where_a_resumed_run_is(capsys):
    bar = progress(total=100, initial=50, desc="pretrain", unit="step")
    for _ in range(50):
        bar.update(1)
    bar.close()
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pretrain:")]
    assert shown[0].startswith("pretrain: 60/100 step (60%") and shown[-1].startswith("pretrain: 100/100 step (100%")


LOG_LINES = """
from mae_et.notices import progress
bar = progress(total=30, desc="pretrain x", unit="step")
for step in range(1, 31):
    bar.update(1)
    if step % 3 == 0:
        print(f"step {step}/30  loss 1.0", flush=True)
"""


def test_progress_and_log_lines_stay_whole_in_one_log_file_opened_twice(tmp_path):
    """`cmd > log 2> log` (or a scheduler's --output and --error naming one file): two descriptors, two offsets.
    Progress on stderr beside log lines on stdout wrote over each other ('...(30%, 76s)step 90/300 ...')."""
    log = tmp_path / "log"
    with open(log, "w") as out, open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", LOG_LINES], cwd=REPO, stdout=out, stderr=err)
    assert proc.returncode == 0
    expected = []
    for step in range(1, 31):
        if step % 3 == 0:
            expected.append(f"pretrain x: {step}/30 step ({100 * step // 30}%")
            expected.append(f"step {step}/30  loss 1.0")
    lines = log.read_text().splitlines()
    assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected)), lines
