"""Run tracking: `metrics.jsonl` always, Weights & Biases through Accelerate's tracker API.

W&B runs offline unless the user is logged in (WANDB_API_KEY or a netrc entry) or asks for
online; a run that resumes keeps its W&B id (stored in the run folder). wandb is optional at
import time, so machines without it still train and write metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import uuid
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from mae_et.files import write_text_atomic
from mae_et.notices import RunWarning
from mae_et.recipes import ConfigError

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"


def wandb_logged_in() -> bool:
    """Whether W&B has credentials here: its environment variables, or its host in the netrc file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    server = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts  # None: ~/.netrc
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host or host == server for host in hosts)


def resolve_wandb_mode(setting: str) -> str | None:
    """'auto' | 'online' | 'offline' | 'off' -> the W&B mode, or None for no W&B; online without a login is one
    line before the run starts, not wandb.init's traceback."""
    if setting == "off":
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        warnings.warn(
            "wandb is not installed: tracking goes to metrics.jsonl only (pip install wandb)", RunWarning, stacklevel=2
        )
        return None
    mode, asked = setting, f"tracking.wandb={setting}"
    if setting == "auto":
        env = os.environ.get("WANDB_MODE")
        if env == "disabled":
            return None
        mode, asked = (env, f"WANDB_MODE={env}") if env in ("online", "offline") else (None, "")
        mode = mode or ("online" if wandb_logged_in() else "offline")
    if mode == "online" and not wandb_logged_in():
        raise ConfigError(
            f"{asked} needs a W&B login, and there is none here (no WANDB_API_KEY, no W&B entry in ~/.netrc): run "
            "`wandb login`, or set tracking.wandb=offline (upload later with wandb sync)"
        )
    return mode


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop lines logged after `after_step` (a resumed run re-logs them): one record per step."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if record.get("step", -1) <= after_step:
            kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


class RunTracker:
    """Writes metrics on the main process only; every method is a no-op on other ranks."""

    def __init__(
        self,
        accelerator,
        run_dir: Path,
        project: str,
        run_name: str,
        config: dict[str, Any],
        wandb_mode: str | None,
        resume_step: int | None,
    ):
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.is_main = accelerator.is_main_process
        self.wandb_mode = wandb_mode
        self.metrics_path = run_dir / METRICS_FILE
        if not self.is_main:
            return
        if resume_step is not None:
            truncate_metrics(self.metrics_path, resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run in an old folder starts a fresh file
        self._file = open(self.metrics_path, "a")
        if wandb_mode is not None:
            id_file = run_dir / WANDB_ID_FILE
            run_id = (
                id_file.read_text().strip() if id_file.is_file() and resume_step is not None else uuid.uuid4().hex[:12]
            )
            write_text_atomic(id_file, run_id)
            os.environ["WANDB_MODE"] = wandb_mode
            accelerator.init_trackers(
                project,
                config=config,
                init_kwargs={
                    "wandb": {
                        "name": run_name,
                        "id": run_id,
                        "resume": "allow",
                        "dir": str(run_dir),
                        "mode": wandb_mode,
                    }
                },
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        # JSON has no NaN or infinity: a non-finite number (the loss of a window of skipped updates) is null
        record = {
            "step": step,
            **{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()},
        }
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.wandb_mode is not None:
            self.accelerator.log(metrics, step=step)

    def log_image(self, key: str, image_uint8: torch.Tensor, step: int) -> None:
        """image_uint8: (3, H, W) uint8."""
        if not self.is_main or self.wandb_mode is None:
            return
        import wandb

        array = image_uint8.permute(1, 2, 0).cpu().numpy().astype(np.uint8)  # (H, W, 3)
        self.accelerator.get_tracker("wandb", unwrap=True).log({key: wandb.Image(array)}, step=step)

    @property
    def wandb_dir(self) -> Path | None:
        return self.run_dir / "wandb" if self.wandb_mode is not None else None

    def close(self) -> None:
        if not self.is_main:
            return
        self._file.close()
        for tracker in self.accelerator.trackers:  # end_training() would also tear down DDP: the engine does that
            tracker.finish()
