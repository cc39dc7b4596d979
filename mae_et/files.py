"""Files a command writes: one writer per run folder, outputs checked before the work, written whole.

    with RunFolderLock(run_dir):          # an exclusive flock on RUN/.run.lock for the run's whole life
        out = check_output_file(path, reads=[checkpoint, data_root], overwrite=args.overwrite, flag="--out")
        write_atomic(out, lambda tmp: save_png(grid, tmp))   # a temporary file beside it, then one rename

Why a flock, what it holds, and the output rules: docs/design.md, "Files a command writes". A leaf below
everything but `mae_et.errors`.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from mae_et.errors import UserError

LOCK_FILE = ".run.lock"
# A folder is a checkpoint when it holds these (mae_et.checkpoint's layout; the fine-tune's best/ too)
_CHECKPOINT_MARKERS = ("meta.json", "model.safetensors")


class FileError(UserError, ValueError):
    """A file or folder a command may not use as asked; one line naming it and the way on."""


class RunFolderBusy(FileError):
    """Another live process holds the run folder's lock."""


# ----------------------------------------------------------------------------- one run per run folder


def _holder_line(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def try_lock(path: str | os.PathLike) -> int | None:
    """An exclusive, non-blocking `flock` on `path` (created if missing, never truncated): the descriptor that
    holds it (close it to release), or None when another open file holds it. A file unlinked between our open and
    our flock would lock nothing, so the path must still name the file we hold, else we try again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _default_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class RunFolderLock:
    """An exclusive, non-blocking `flock` on `folder/.run.lock`, held until `release()` (or the process ends);
    `acquire()` raises `RunFolderBusy` naming the holder, for a second lock in this process too."""

    def __init__(
        self,
        folder: str | os.PathLike,
        what: str = "run folder",
        ways_on: str | None = None,
        lock_name: str = LOCK_FILE,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / lock_name
        self.what = what
        self.ways_on = ways_on or "wait for it to end, or give this run another output_dir= or name="
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunFolderLock:
        if self._fd is not None:
            return self
        fd = try_lock(self.path)
        if fd is None:
            try:
                holder = self.path.read_text(errors="replace")
            except OSError:
                holder = ""
            raise RunFolderBusy(
                f"{self.what} '{self.folder}' is in use by another run ({_holder_line(holder)}); {self.ways_on}"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        _held.add(self)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None
        _held.discard(self)

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_held: weakref.WeakSet[RunFolderLock] = weakref.WeakSet()  # the locks this process holds


def _drop_locks_in_child() -> None:
    """In a forked child: close its copies of the lock files (closing never unlocks the parent's; LOCK_UN would)."""
    for lock in list(_held):
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    _held.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


# ----------------------------------------------------------------------------- outputs


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def inside_checkpoints(path: str | os.PathLike) -> Path | None:
    """The checkpoint folder or run `checkpoints/` folder that `path` (resolved) lies in, or None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if folder.is_dir() and all((folder / m).is_file() for m in _CHECKPOINT_MARKERS):
            return folder
        if (
            folder.name == "checkpoints"
            and folder.is_dir()
            and ((folder.parent / "config.yaml").is_file() or any(folder.glob("step_*")))
        ):
            return folder
    return None


def check_output_file(
    path: str | os.PathLike,
    reads: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    flag: str = "the output",
    suffix: str | None = None,
) -> Path:
    """`path` if a command may write it, else `FileError` in one line; call it before the work. `reads`: the files
    and folders the command reads (an output may not be one, nor lie inside one)."""
    out = Path(path)
    if out.is_dir():
        raise FileError(f"{flag} '{out}' is a folder; give a file name, e.g. {out / ('out' + (suffix or ''))}")
    if suffix is not None and out.suffix != suffix:
        raise FileError(f"{flag} '{out}' must end with {suffix}; e.g. {out.with_suffix(suffix)}")
    resolved = out.resolve()
    for r in reads:
        src = Path(r).resolve()
        if resolved == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise FileError(f"{flag} '{out}' is also an input of this command; write it somewhere else")
        if src.is_dir() and _inside(resolved, src):
            raise FileError(f"{flag} '{out}' lies inside '{r}', which this command reads; write it somewhere else")
    held = inside_checkpoints(out)
    if held is not None:
        raise FileError(
            f"{flag} '{out}' lies inside the checkpoints '{held}', which a run resumes from; write it somewhere else"
        )
    if out.exists() and not overwrite:
        raise FileError(f"{flag} '{out}' exists; pass --overwrite to replace it, or choose another name")
    parent = next(p for p in resolved.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise FileError(f"{flag} '{out}' cannot be written: '{parent}' is not a writable folder")
    return out


def check_output_folder(
    path: str | os.PathLike, reads: Iterable[str | os.PathLike] = (), flag: str = "the output folder"
) -> Path:
    """A folder a command fills (it may exist already: a run or study resumes in it); `FileError` when it may not."""
    out = Path(path)
    resolved = out.resolve()
    for r in reads:
        src = Path(r).resolve()
        if _inside(resolved, src) or _inside(src, resolved):
            raise FileError(f"{flag} '{out}' overlaps '{r}', which this command reads; choose a folder outside it")
    held = inside_checkpoints(out)
    if held is not None:
        raise FileError(f"{flag} '{out}' lies inside the checkpoints '{held}'; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise FileError(f"{flag} '{out}' is a file; give a folder")
    parent = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileError(f"{flag} '{out}' cannot be written: '{parent}' is not writable")
    return out


# ----------------------------------------------------------------------------- writing whole files


def _default_mode() -> int:
    """0o666 less the umask, as `open(path, 'w')` gives; read from /proc where it can be (setting the umask to
    read it back is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the umask's mode (safetensors creates its files 0600)."""
    os.chmod(path, _default_mode())


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` writes the whole file beside `path`, which one rename then replaces; on any failure the
    temporary file is removed and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        follow_umask(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data on disk before the name points at it
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, with the file's mode following the umask."""
    from safetensors.torch import save_file  # local: this module stays importable without torch

    save_file(tensors, os.fspath(path), metadata=metadata)
    follow_umask(path)


# ----------------------------------------------------------------------------- full disks


def is_disk_full(error: BaseException, folder: str | os.PathLike, needed_bytes: int = 0) -> bool:
    """Whether a write failed for want of space: ENOSPC / EDQUOT, a library's wording of it, or less free space
    left than it needed (torch's zip writer says only 'unexpected pos')."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left" in text or "os error 28" in text or "Disk quota" in text:
        return True
    try:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    except OSError:
        return False
    return free < max(needed_bytes, 1 << 16)


@contextlib.contextmanager
def one_line_on_full_disk(target: str | os.PathLike, needed_bytes: int = 0) -> Iterator[None]:
    """Around the writes of one output (whose writer removes what it leaves unfinished): a full disk is one
    `FileError` line naming `target`, not a library's traceback."""
    try:
        yield
    except Exception as e:
        folder = Path(target) if Path(target).is_dir() else Path(target).parent
        if not is_disk_full(e, folder, needed_bytes):
            raise
        raise FileError(
            f"no space left on device while writing '{target}'; nothing half-written was left: free some space "
            "and run the same command again"
        ) from None


def move_into(folder: Path, names: Iterable[str], into: Path) -> None:
    """Each of `names` found in `folder` moved into `into`, one rename each (an earlier run set aside)."""
    for name in names:
        if (folder / name).exists():
            os.replace(folder / name, into / name)
