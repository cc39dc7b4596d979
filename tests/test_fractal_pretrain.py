"""The real no-argument command, `python pretrain.py`, made small: fractals in, kNN well above chance out.

The only overrides make the run small (a 2-block micro encoder instead of ViT-Tiny) and keep it
off W&B and in a temporary folder; everything else is the default fractal recipe (64 px, patch 8,
`et` curriculum, 20 epochs of 100 fresh renders per class, 300 steps of batch 64).

Measured with exactly this command (train.seed 0 / 1 / 2, 48-51 s each with one intra-op thread on
a busy 2-core machine): final kNN top-1 cls 50.5 / 48.0 / 53.5 %, mean-token 32.5 / 36.0 / 41.0 %;
chance is 10 %. The bound below is 3x chance for the better of the two poolings, 18 points under
the lowest measured. A random-init micro encoder already scores 33-50 % (cls) on these renders,
so the kNN bound alone does not prove learning: the loss check does (3.47 -> 1.33 at seed 0; on
held-out renders the final models' masked-patch MSE is 1.32 / 1.10 / 1.36 against 1.77 / 1.52 /
1.78 for predicting the mean of the visible patches).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from mae_et import checkpoint as ck

from conftest import ONE_THREAD_ENV, REPO

NUM_CLASSES = 10  # the recipe's data.fractal_classes
MIN_KNN = 3 * 100.0 / NUM_CLASSES  # percent, for the better of cls / mean


def test_no_argument_command_pretrains_on_fractals_and_beats_chance(tmp_path: Path) -> None:
    cmd = [sys.executable, "pretrain.py", f"output_dir={tmp_path}", "tracking.wandb=off", "model.size=micro"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout

    # It says where the checkpoint and the metrics are, and they are there.
    where = re.search(r"^finished\. checkpoint: (.+); metrics: (.+metrics\.jsonl)$", out, re.MULTILINE)
    assert where, out[-2000:]
    checkpoint, metrics_file = Path(where[1]), Path(where[2])
    assert checkpoint.is_dir() and (checkpoint / ck.MODEL_FILE).is_file()
    assert metrics_file.is_file() and tmp_path in metrics_file.parents
    run_dir = metrics_file.parent
    assert checkpoint.parent == run_dir / "checkpoints"
    assert json.loads((checkpoint / "meta.json").read_text())["complete"]

    # No data root given: the run trained on generated fractals.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["source"] == "fractal" and config["data"]["root"] is None
    assert config["data"]["fractal_classes"] == NUM_CLASSES

    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    knn = [r for r in records if "knn_top1_cls" in r]
    assert knn and knn[-1]["step"] == records[-1]["step"]  # the last record carries the final kNN

    # It prints the kNN accuracy, the same numbers as the metrics file.
    printed = re.findall(r"^step (\d+): kNN top-1 cls ([\d.]+)%, mean ([\d.]+)%$", out, re.MULTILINE)
    assert printed, out[-2000:]
    step, cls, mean = printed[-1]
    final = knn[-1]
    assert int(step) == final["step"]
    assert abs(float(cls) - final["knn_top1_cls"]) < 0.06 and abs(float(mean) - final["knn_top1_mean"]) < 0.06

    # It learned (the loss falls far below its start) and the encoder tells the classes apart.
    assert records[-1]["loss"] < 0.6 * records[0]["loss"], [r["loss"] for r in records]
    best = max(final["knn_top1_cls"], final["knn_top1_mean"])
    assert best >= MIN_KNN, f"final kNN top-1 cls {final['knn_top1_cls']:.1f}%, mean {final['knn_top1_mean']:.1f}% (chance 10%)"
