"""A full disk during a checkpoint write: the half-written folder goes, the previous checkpoint stays, one line.

The run goes to a 2.6 MB tmpfs mounted in a private mount namespace (as root, or as a user namespace's root
where the kernel allows one): one checkpoint of the micro recipe (1.7 MB) fits, a second does not.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from helpers import CPU_RECIPE, MOUNT, REPO, namespace_prefix

SIZE = "2600k"


def test_a_full_disk_stops_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, mini_root):
    prefix = namespace_prefix()
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs root or unprivileged user namespaces)")
    out = tmp_path / "small_disk"
    out.mkdir()
    run_dir = out / CPU_RECIPE.stem
    train = [
        sys.executable,
        str(REPO / "pretrain.py"),
        "--config",
        str(CPU_RECIPE),
        f"data.root={mini_root}",
        f"output_dir={out}",
        "tracking.wandb=off",
        "tracking.recon_every_epochs=0",
        "train.epochs=1",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=10",
    ]
    # the listing must be taken inside the namespace: the tmpfs goes with it
    script = (
        f"{MOUNT.format(size=SIZE, dir=shlex.quote(str(out)))} && "
        f"{shlex.join(train)} 2>{shlex.quote(str(tmp_path / 'err'))}; "
        f"echo rc=$?; find {shlex.quote(str(run_dir))} -mindepth 1 | sort"
    )
    proc = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    err = (tmp_path / "err").read_text().strip().splitlines()
    assert "rc=2" in lines, proc.stdout + "\n".join(err)
    step5, step10 = run_dir / "checkpoints" / "step_00000005", run_dir / "checkpoints" / "step_00000010"
    assert err[-1] == (
        f"error: no space left on device while writing step 10 to {step10}; step 5 is intact ({step5}); "
        "free some space (or set checkpoint.keep_last lower) and relaunch the same command to resume"
    )
    assert not any(line.startswith(("Traceback", "RuntimeError")) for line in err)
    listing = [line for line in lines if line.startswith(str(run_dir))]
    assert not any("/.tmp-" in line for line in listing)  # the half-written folder (and its lock) are gone
    kept = [p for p in listing if p.startswith(str(run_dir / "checkpoints") + "/step_")]
    assert kept == sorted(
        [str(step5)] + [str(step5 / f) for f in ("config.yaml", "meta.json", "model.safetensors", "training_state.pt")]
    )
