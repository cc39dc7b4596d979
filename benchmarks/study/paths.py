"""How the study names files: paths inside the checkout recorded relative to it, and launched commands recorded with
`python` and relative paths, so that a published file names no machine and reads the same after a rerun elsewhere;
and where a study's folder and its published copy are."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import REPO


def repo_relative(path: Path) -> str:
    """A path inside the repository as relative to it (the same on every checkout), any other as given."""
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def in_repo(path: str | Path) -> Path:
    """A path the study recorded (relative to the checkout, as `repo_relative` writes it; an absolute one as is)."""
    return REPO / path


def _relative(path: str) -> str:
    return repo_relative(Path(os.path.normpath(path))) if path.startswith("/") else path


def _portable_argument(arg: str) -> str:
    key, eq, value = arg.partition("=")
    if not eq:
        return _relative(arg)
    quoted = len(value) > 1 and value[0] == value[-1] == '"'  # data.root="..." (JSON-quoted)
    plain = _relative(value[1:-1] if quoted else value)
    return f"{key}=" + (f'"{plain}"' if quoted else plain)


def portable_command(command: list[str]) -> list[str]:
    """A launched command as results.json records it: `python` for this interpreter and every path inside the
    checkout relative to it, so a published file names no machine and reads the same after a rerun elsewhere."""
    return ["python", *(_portable_argument(a) for a in command[1:])]


def default_out(study_name: str) -> Path:
    """A study's folder when --out is not given."""
    return REPO / "runs" / "study" / study_name


def published_folder(study_name: str) -> Path:
    """Where --publish copies a study's report and state (committed)."""
    return REPO / "benchmarks" / "results" / study_name
