"""Checkpoints on disk: atomic writes, which folder a path means, and loading without pickle's full power.

`RUN/checkpoints/step_00001234/` holds model.safetensors (the full MAE, reference names), training_state.pt
(optimizer, scaler, counters, clocks), config.yaml (the resolved config) and meta.json (step, stage, progress),
written last. A kill at any moment leaves the latest complete checkpoint readable, and a Python object planted in
a run folder is refused, never run (docs/design.md, "Atomic checkpoints, weights-only loading").
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mae_et.errors import UserError
from mae_et.files import is_disk_full, save_safetensors, try_lock
from mae_et.notices import RunWarning

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
PREV_SUFFIX = ".prev"  # the replaced copy of a step saved again, kept until its successor is in place
_LOCK_SUFFIX = ".lock"  # a writer's lock, beside its temporary folder
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)(?:{re.escape(PREV_SUFFIX)})?")
MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


class CheckpointError(UserError, RuntimeError):
    """An unreadable or unsuitable checkpoint, with a message naming the file and the fix."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (a full disk); its temporary folder is gone, earlier ones are intact."""


class UnreadableFileError(CheckpointError):
    """A file or folder this user may not read: the fix is access, never deleting it or using an older one."""


def check_readable(*paths: Path) -> None:
    """`UnreadableFileError` for the first of `paths` this user may not open (safetensors would call it missing);
    missing files are left to each loader's own message."""
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except PermissionError as e:
            raise UnreadableFileError(f"'{path}' cannot be read ({e.strerror}); give this user read access") from None
        except OSError:
            continue


class RefusedFileError(CheckpointError):
    """A torch file holding pickled Python objects beyond plain data; it was not loaded (nothing in it ran)."""


# What torch's weights-only unpickler names when it stops at something it will not build:
# "Unsupported global: GLOBAL posix.system ...", "... unsupported GLOBAL x.y whose module ...",
# "Can only create new object for ... but got <class 'x.Y'>", "Can only build ... but got <class 'x.Y'>".
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSED_OBJECT = re.compile(r"Can only (?:create new object|build)\b.*?but got (?:<class '([\w.]+)'>|([\w.]+))")


def refused_global(error: BaseException) -> str | None:
    """The global (function or class) a weights-only torch.load refused, or None when it refused none."""
    text = str(error)
    m = _REFUSED_GLOBAL.search(text)
    if m:
        return m.group(1).rstrip(".")
    m = _REFUSED_OBJECT.search(text)
    return (m.group(1) or m.group(2)).rstrip(".") if m else None


def _unpickler_reason(error: BaseException) -> str:
    """The one line of torch's long weights-only message that says what went wrong."""
    text = str(error)
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [
        ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation", "(1)", "(2)"))
    ]
    return (useful or lines or [type(error).__name__])[0]


def torch_load_plain(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    fix: str,
    allowed_globals: tuple[type, ...] = (),
) -> Any:
    """`torch.load(path, weights_only=True)`, plus `allowed_globals` (harmless types of a known format, for this
    call only). Any other Python object: `RefusedFileError` naming the global and `fix`; a malformed pickle: a short
    `pickle.UnpicklingError`; other failures as torch raised them."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        name = refused_global(e)
        if name is None:  # not a refused object: a corrupt or foreign pickle
            raise pickle.UnpicklingError(_unpickler_reason(e)) from None
        raise RefusedFileError(
            f"file '{os.fspath(path)}' refused: it holds Python objects that could run code when loaded ({name}); {fix}"
        ) from None


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
    """Write checkpoint `step` under `root` atomically, then keep only the newest `keep_last` up to `step`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    _settle_replaced(root)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(step)}-{socket.gethostname()}-{os.getpid()}"
    writer_lock = tmp.with_name(tmp.name + _LOCK_SUFFIX)
    fd = try_lock(writer_lock)  # held while this process writes: no other save may take the folder for stale
    if fd is None:
        raise CheckpointError(f"another process is writing checkpoint {tmp}; give each run its own output folder")
    try:
        try:
            _write_into(tmp, model_state, training_state, config_yaml, meta)
            _move_into_place(root, tmp, final)
        except BaseException as e:
            needed = sum(v.numel() * v.element_size() for v in model_state.values())
            full = isinstance(e, Exception) and is_disk_full(e, root, needed)  # asked before the space is freed
            shutil.rmtree(tmp, ignore_errors=True)
            if not full:
                raise
            intact = list_checkpoints(root)
            raise CheckpointWriteError(
                f"no space left on device while writing step {step} to {final}; "
                + (
                    f"step {checkpoint_step(intact[-1])} is intact ({intact[-1]})"
                    if intact
                    else "no earlier checkpoint exists"
                )
                + "; free some space (or set checkpoint.keep_last lower) and relaunch the same command to resume"
            ) from None
    finally:
        writer_lock.unlink(missing_ok=True)
        os.close(fd)
    # the newest keep_last up to this step stay: a later step in the folder (one the resume passed over as
    # unreadable) is not this run's newest, and counting it would delete the checkpoint just written
    for old in [p for p in list_checkpoints(root) if checkpoint_step(p) <= step][:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (`step_N` or `step_N.prev`)."""
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


def _write_into(
    tmp: Path,
    model_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    config_yaml: str,
    meta: dict[str, Any],
) -> None:
    tmp.mkdir()
    # safetensors wants contiguous tensors that share no memory
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / MODEL_FILE)
    torch.save(training_state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)


def _move_into_place(root: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # the same step saved again (e.g. max_steps reached twice): replace it, never lacking it
        replaced = final.with_name(final.name + PREV_SUFFIX)
        os.replace(final, replaced)
        _fsync_path(root)  # from here a kill leaves step_N.prev, which counts as step N
        os.replace(tmp, final)
        _fsync_path(root)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(root)


def _remove_stale_tmp(root: Path) -> None:
    """Temporary folders of writers that are gone (a free writer lock, or none); a live writer's stay."""
    for lock in root.glob(f"{TMP_PREFIX}*{_LOCK_SUFFIX}"):
        fd = try_lock(lock)
        if fd is None:
            continue  # a live writer
        try:
            shutil.rmtree(lock.with_name(lock.name[: -len(_LOCK_SUFFIX)]), ignore_errors=True)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        if stale.is_dir() and not stale.with_name(stale.name + _LOCK_SUFFIX).exists():
            shutil.rmtree(stale, ignore_errors=True)


def _settle_replaced(root: Path) -> None:
    """After a kill during a re-save: drop `step_N.prev` when `step_N` is in place, else put it back as `step_N`."""
    for replaced in root.glob(f"{CHECKPOINT_PREFIX}*{PREV_SUFFIX}"):
        final = replaced.with_name(replaced.name[: -len(PREV_SUFFIX)])
        if (final / META_FILE).is_file():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(replaced, final)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in root.iterdir():
        m = _CHECKPOINT_NAME.fullmatch(p.name)
        if m is None or not p.is_dir() or not (p / META_FILE).is_file():
            continue
        step = int(m.group(1))
        if step not in by_step or by_step[step].name.endswith(PREV_SUFFIX):  # step_N wins over step_N.prev
            by_step[step] = p
    return [by_step[step] for step in sorted(by_step)]


# What to do about a refused training_state.pt: this project never writes one that holds objects.
_REFUSED_STATE_FIX = (
    "mae_et writes only tensors, numbers and dicts there, so the file was not written by a run; "
    "delete that checkpoint folder to resume from an earlier one"
)


def is_run_folder(path: Path) -> bool:
    """A run folder: it holds checkpoints/ (what it means is its latest checkpoint, never a file beside it)."""
    return (path / "checkpoints").is_dir()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder a user means: a run folder (its latest complete checkpoint, never an export beside
    it), its checkpoints/, a step_* folder or its model.safetensors; anything else is a one-line CheckpointError."""
    try:
        return _resolve_checkpoint(Path(path))
    except PermissionError as e:  # a folder this user may not look into
        raise UnreadableFileError(f"'{e.filename}' cannot be read ({e.strerror}); give this user read access") from None


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_file() and path.name == MODEL_FILE and not is_run_folder(path.parent):
        path = path.parent
    if not path.exists():
        raise CheckpointError(
            f"'{path}' does not exist; pass a run folder (runs/NAME) or one of its checkpoints/step_* folders"
        )
    if is_run_folder(path):
        found = list_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(
                f"run folder '{path}' has no complete checkpoint under checkpoints/; train longer or pass another run"
            )
        return found[-1]
    if (path / META_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    found = list_checkpoints(path)  # a run's checkpoints/ folder itself
    if found:
        return found[-1]
    runs = sorted(p.name for p in path.iterdir() if (p / "checkpoints").is_dir()) if path.is_dir() else []
    if runs:
        raise CheckpointError(
            f"'{path}' holds run folders, not one run; pass one of: {', '.join(str(path / r) for r in runs)}"
        )
    raise CheckpointError(
        f"'{path}' is not a checkpoint: expected a run folder with checkpoints/step_*/ or a step_* "
        f"folder holding {META_FILE}, {CONFIG_FILE} and {MODEL_FILE}"
    )


def require_pretraining(folder: Path, config: Any) -> None:
    """A checkpoint read as a pretrained MAE must be a pretraining run's, not an evaluation's classifier (whose
    config names its encoder, model.checkpoint): else one line naming the run to pass instead."""
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and "checkpoint" in model:
        what = "a linear probe's classifier" if "linprobe" in config else "a fine-tuned classifier"
        raise CheckpointError(
            f"'{folder}' is {what}, not a pretrained encoder; pass the pretraining run it started from "
            f"(its model.checkpoint: {model['checkpoint']})"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """One checkpoint folder. A training_state.pt holding Python objects raises `RefusedFileError`, a file this user
    may not read `UnreadableFileError`."""
    path = Path(path)
    check_readable(path / META_FILE, path / MODEL_FILE, path / STATE_FILE)
    try:
        meta = json.loads((path / META_FILE).read_text())
        model_state = load_file(str(path / MODEL_FILE), device=str(map_location))
        training_state = torch_load_plain(path / STATE_FILE, map_location, fix=_REFUSED_STATE_FIX)
    except RefusedFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable ({type(e).__name__}: {reason}); delete that folder to use an "
            "earlier one"
        ) from e
    return Checkpoint(path=path, model_state=model_state, training_state=training_state, meta=meta)


def load_latest_checkpoint(root: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest readable checkpoint; an unreadable one is reported and the previous one used. A refused one
    (tampering) or one this user may not read (not broken) stops the resume instead (docs/design.md)."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path, map_location)
        except (RefusedFileError, UnreadableFileError):
            raise
        except CheckpointError as e:
            warnings.warn(f"{e}; trying the previous checkpoint", RunWarning, stacklevel=2)
    return None
