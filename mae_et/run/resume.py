"""Resuming a run from its latest checkpoint, and what is checked first: the model that wrote it (a changed model
stops in one line, not a traceback), the encoder an evaluation started from, and the config (a changed key warns).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator

from mae_et import checkpoint as ckpt_lib
from mae_et.models.keys import compare_state
from mae_et.notices import RunWarning
from mae_et.recipes import flatten_dict
from mae_et.run.config import RunSpec


def resume_latest(
    spec: RunSpec, checkpoints: Path, raw_model: torch.nn.Module, optimizer, accelerator: Accelerator
) -> ckpt_lib.Checkpoint | None:
    """Load the latest checkpoint in `checkpoints` into the model, optimizer and grad scaler (when
    `checkpoint.resume`)."""
    if not spec.checkpoint.resume:
        return None
    found = ckpt_lib.load_latest_checkpoint(checkpoints)
    if found is None:
        return None
    require_same_start(found.path, spec)
    require_same_model(found.path, found.model_state, raw_model, spec)
    raw_model.load_state_dict(found.model_state, strict=True)
    optimizer.load_state_dict(found.training_state["optimizer"])
    if accelerator.scaler is not None and found.training_state.get("scaler"):
        accelerator.scaler.load_state_dict(found.training_state["scaler"])
    warn_config_changes(found.path, spec)
    accelerator.print(f"resumed from {found.path} at step {found.training_state['step']}")
    return found


def require_same_model(ckpt_path: Path, saved_state: dict, raw_model: torch.nn.Module, spec: RunSpec) -> None:
    """Resume only into the model that wrote the checkpoint: otherwise one line naming the weights and config
    keys that differ, and the two ways on (instead of load_state_dict's traceback)."""
    mismatch = compare_state(saved_state, raw_model.state_dict())
    if not mismatch:
        return
    changed = [
        f"{k} ({a!r} -> {b!r})" for k, (a, b) in config_changes(ckpt_path, spec).items() if k.startswith("model.")
    ]
    because = f" (config: {', '.join(changed)})" if changed else ""
    raise ckpt_lib.CheckpointError(
        f"cannot resume from {ckpt_path}: the model differs from the one that wrote it{because}; "
        + mismatch.summary()
        + f". Set a new output_dir (now {spec.output_dir}) to start a new run, or checkpoint.resume=false to start "
        "over in this folder (the earlier run is moved aside)"
    )


def require_same_start(ckpt_path: Path, spec: RunSpec) -> None:
    """An evaluation run resumes only from the encoder it started from (the same `model.checkpoint`, as written or
    resolved): else it would resume the old fine-tune under the new encoder's name."""
    start = config_changes(ckpt_path, spec).get("model.checkpoint")
    if spec.encoder is None or start is None:  # pretraining; or the same as written
        return
    saved, now = start
    if saved is not None and Path(str(saved)).resolve() == Path(now).resolve():
        return
    earlier = f"model.checkpoint '{saved}'" if saved is not None else "no model.checkpoint (a pretraining run)"
    raise ckpt_lib.CheckpointError(
        f"run folder '{spec.run_dir}' holds a run from {earlier} (up to {ckpt_path}), not from model.checkpoint "
        f"'{now}'; give this run another name=, or pass checkpoint.resume=false to start over here (the earlier "
        "run is moved aside)"
    )


def saved_config(ckpt_path: Path) -> dict[str, Any]:
    """The config a checkpoint was written with ({} when it has none); one line naming the file when it is not
    a YAML mapping."""
    saved_file = ckpt_path / ckpt_lib.CONFIG_FILE
    if not saved_file.is_file():
        return {}
    try:
        saved = yaml.safe_load(saved_file.read_text()) or {}
        problem = None if isinstance(saved, dict) else f"a {type(saved).__name__}, not a mapping of sections"
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        problem = f"not readable YAML: {str(getattr(e, 'problem', None) or e).splitlines()[0]}"
    if problem is not None:
        raise ckpt_lib.CheckpointError(
            f"the config of checkpoint '{ckpt_path}' ('{saved_file}') is unusable ({problem}); delete that "
            "checkpoint folder to resume from the one before, or pass checkpoint.resume=false to start over (the "
            "earlier run is moved aside)"
        )
    return saved


def config_changes(ckpt_path: Path, spec: RunSpec) -> dict[str, tuple[Any, Any]]:
    """Flattened keys whose value differs between the checkpoint's saved config and this run's: (saved, now)."""
    saved = flatten_dict(saved_config(ckpt_path))
    now = flatten_dict(spec.config)
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def warn_config_changes(ckpt_path: Path, spec: RunSpec) -> None:
    # stopping early and resuming are what resume is for; the start point's hash is the run's own record
    ignored = {"train.max_steps", "checkpoint.resume", "model.init_sha256"}
    changed = {k: v for k, v in config_changes(ckpt_path, spec).items() if k not in ignored}
    if changed:
        warnings.warn(
            "resuming with a config that differs from the checkpoint's in: "
            + ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in changed.items())
            + "; the schedule is recomputed from the new values",
            RunWarning,
            stacklevel=2,
        )
