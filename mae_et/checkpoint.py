"""Atomic checkpoints: write into a hidden temporary folder, fsync, then rename into place.

Layout of one checkpoint, `RUN/checkpoints/step_00001234/`:
    model.safetensors   the full MAE (encoder + decoder), reference parameter names
    training_state.pt   optimizer, grad scaler, counters, RNG, elapsed time
    config.yaml         the resolved config of the run
    meta.json           step, epoch, curriculum stage and size, progress; written last

A folder counts as a checkpoint only when it is named `step_*` and holds meta.json, and a
folder gets that name only by an atomic rename after everything inside was fsynced; so a kill
at any moment leaves the latest complete checkpoint readable. Stale temporary folders from a
killed save are removed at the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """An unreadable or unsuitable checkpoint, with a message naming the file and the fix."""


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    config_yaml: str,
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` under `root` atomically, then keep only the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    tmp.mkdir()
    # safetensors wants contiguous tensors that share no memory
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
    torch.save(training_state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)
    if final.exists():  # the same step saved again (e.g. max_steps reached twice): replace it
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        model_state = load_file(str(path / MODEL_FILE), device=str(map_location))
        training_state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(e).__name__}: {e}); delete that folder to use an earlier one") from e
    return Checkpoint(path=path, model_state=model_state, training_state=training_state, meta=meta)


def load_latest_checkpoint(root: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest readable checkpoint; an unreadable one is reported and the previous one used."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path, map_location)
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint", stacklevel=2)
    return None
