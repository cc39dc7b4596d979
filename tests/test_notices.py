"""What a person sees: one-line warnings and progress (a bar on a terminal, plain lines in a log)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

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
    progress_lines = [line for line in lines if line.startswith("decode once:")]
    assert progress_lines[0].startswith("decode once: 4/40 img (10%") and progress_lines[-1].startswith("decode once: 40/40")
    assert len(progress_lines) == 10 and "\r" not in proc.stderr
    assert not any(line.startswith("hidden") for line in lines)  # other ranks show nothing


def test_progress_counts_updates_and_starts_where_a_resumed_run_is(capsys):
    bar = progress(total=100, initial=50, desc="pretrain", unit="step")
    for _ in range(50):
        bar.update(1)
    bar.close()
    shown = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pretrain:")]
    assert shown[0].startswith("pretrain: 60/100 step (60%") and shown[-1].startswith("pretrain: 100/100 step (100%")
