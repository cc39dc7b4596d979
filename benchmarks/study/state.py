"""What a study has done, kept so that a relaunch redoes nothing that still holds: state.json (every finished
pretraining and evaluation, keyed by the settings that produced it), the settings keys themselves, where a new
checkout's state starts from, and the locks that make each part of a study (pretraining, evaluation) one process's."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.study.config import run_name
from benchmarks.study.paths import repo_relative
from mae_et.files import RunFolderLock, try_lock, write_text_atomic

STATE_FILE = "state.json"
# Study roles: the pretraining (the default, and --pretrain-only) and the evaluation (the default, --eval-only and
# --report-only) each belong to one process at a time; a --pretrain-only and an --eval-only process share a study.
ROLE_LOCKS = {"pretrain": ".pretrain.lock", "eval": ".eval.lock"}


def canonical(key: Any) -> Any:
    """A settings key with every list of override strings sorted (the order they were written in is no setting)
    and without the run's name (a folder name, no setting either: a row carried into another study under another
    name, `carry_study_state.py --rename`, is read back by its settings)."""
    if isinstance(key, dict):
        return {k: canonical(v) for k, v in key.items()}
    if isinstance(key, list) and all(isinstance(x, str) for x in key):
        return sorted(x for x in key if not x.startswith("name="))
    return key


class StudyState:
    """state.json: every finished pretraining and evaluation, keyed by the settings that produced it, so a
    relaunch redoes nothing that still holds and everything whose settings changed.

    Several study processes may share one state (e.g. one per seed, each on its own core): every change is
    a read-modify-write of the file under an exclusive lock, written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.lock_path = path.with_suffix(".lock")
        self.data = self._read()

    def _read(self) -> dict[str, Any]:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        data.setdefault("runs", {})
        data.setdefault("launches", {})
        return data

    @contextmanager
    def locked(self):
        """The state as the file holds it now, under the lock every study process takes; written back atomically
        when the block ends (what another process wrote meanwhile is read first, so nothing of it is lost)."""
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.data = self._read()  # what the other processes wrote meanwhile
            yield self.data
            write_text_atomic(self.path, json.dumps(self.data, indent=2))  # a kill mid-write leaves the previous state

    def get(self, run: str, seed: int, kind: str, key: Any) -> dict | None:
        entry = self.data["runs"].get(run, {}).get(str(seed), {}).get(kind)
        return entry["value"] if entry and canonical(entry["key"]) == canonical(key) else None

    def reload(self) -> None:
        self.data = self._read()

    def key_of(self, run: str, seed: int, kind: str) -> Any:
        return self.data["runs"][run][str(seed)][kind]["key"]

    def put(self, run: str, seed: int, kind: str, key: Any, value: dict) -> None:
        with self.locked() as data:
            data["runs"].setdefault(run, {}).setdefault(str(seed), {})[kind] = {"key": key, "value": value}

    def count_launch(self, name: str) -> int:
        with self.locked() as data:
            n = data["launches"][name] = data["launches"].get(name, 0) + 1
        return n


def open_state(out: Path, published: Path) -> StudyState:
    """The study folder's state; a folder without one (a new checkout) starts from the published state, so that
    finished (and evaluated) seeds are read back, not rerun."""
    if not (out / STATE_FILE).is_file() and (published / STATE_FILE).is_file():
        shutil.copy2(published / STATE_FILE, out / STATE_FILE)
        print(f"starting from the published state {published / STATE_FILE}")
    return StudyState(out / STATE_FILE)


def is_finished(entry: dict[str, Any]) -> bool:
    """A (row, seed) entry whose pretraining and evaluation both finished: all its numbers are in the state."""
    return "pretrain" in entry and "eval" in entry


def carry_finished(
    src: dict[str, Any],
    dst: dict[str, Any],
    rows: list[str] | None = None,
    keep_unfinished: bool = False,
    rename: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Carry every finished (row, seed) of the state `src` into the state `dst` (both as state.json holds them), for
    a fresh machine, where run folders are gone: what was only pretrained there names checkpoints that no longer
    exist, so `dst` keeps finished entries only, unless `keep_unfinished` (a `dst` that a running study writes:
    its only-pretrained rows are this machine's, waiting for their evaluation). `rows`: only these rows (e.g. those
    another study shares, trained by the same commit with the same settings; the keys decide at read-back whether
    they still hold). `rename`: {row of src: its name in dst} (`rows` names src's rows). A finished entry of `dst`
    that differs from `src`'s is kept, not replaced; an unfinished one with src's pretraining takes src's entry.
    Returns the '<row> seed <seed>' carried, dropped (unfinished in `dst`) and kept."""
    said: dict[str, list[str]] = {"carried": [], "dropped": [], "kept": []}
    for row, per_seed in dst["runs"].items():
        for seed in [s for s, entry in per_seed.items() if not is_finished(entry) and not keep_unfinished]:
            del per_seed[seed]
            said["dropped"].append(f"{row} seed {seed}")
    dst["runs"] = {row: per_seed for row, per_seed in dst["runs"].items() if per_seed}
    rename = rename or {}
    for src_row, per_seed in src["runs"].items():
        if rows is not None and src_row not in rows:
            continue
        row = rename.get(src_row, src_row)
        for seed, entry in per_seed.items():
            if not is_finished(entry):
                continue
            mine = dst["runs"].get(row, {}).get(seed)
            waiting = mine is not None and not is_finished(mine) and mine["pretrain"] == entry["pretrain"]
            if mine is not None and mine != entry and not waiting:  # (one waiting for this evaluation takes it)
                said["kept"].append(f"{row} seed {seed}")
                continue
            dst["runs"].setdefault(row, {})[seed] = entry
            name, src_name = run_name(row, int(seed)), run_name(src_row, int(seed))
            if src_name in src["launches"]:
                dst["launches"][name] = max(src["launches"][src_name], dst["launches"].get(name, 0))
            said["carried"].append(f"{row} seed {seed}")
    return said


def settings_key(overrides: list[str]) -> list[str]:
    """The overrides that decide a run's numbers: the output folder does not, and the data root is kept relative
    to the repository, so a study resumed from another checkout path still finds its finished runs."""
    key = []
    for o in overrides:
        if o.startswith("output_dir="):
            continue
        if o.startswith("data.root="):
            o = f"data.root={repo_relative(json.loads(o.split('=', 1)[1]))}"
        key.append(o)
    return key


def roles_running(out: Path) -> list[str]:
    """The roles (pretrain, eval) a live study process holds in the study folder `out` now."""
    running = []
    for role, name in ROLE_LOCKS.items():
        if not (out / name).is_file():
            continue
        fd = try_lock(out / name)
        if fd is None:
            running.append(role)
        else:
            os.close(fd)  # free: no process plays this role
    return running


@contextmanager
def study_roles(out: Path, roles: list[str]):
    """Hold the study folder's lock of each role this process plays, for its whole life."""
    held = []
    try:
        for role in roles:
            held.append(
                RunFolderLock(
                    out,
                    what=f"study folder ({role})",
                    lock_name=ROLE_LOCKS[role],
                    ways_on=f"another study process is doing its {role} part; wait for it to end, "
                    "or give this study another --out",
                ).acquire()
            )
        yield
    finally:
        for lock in held:
            lock.release()
