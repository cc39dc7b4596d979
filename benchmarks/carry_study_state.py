"""Carry a study's finished rows into another state.json: for a study resumed on a fresh machine, or a study that
shares rows with another one trained by the same commit.

    python benchmarks/carry_study_state.py SRC DST [--rows baseline untrained ...] [--rename OLD=NEW ...]

SRC and DST are state.json files (DST may not exist yet). Every (row, seed) of SRC whose pretraining and evaluation
both finished is written into DST; DST keeps finished entries only (a row that was only pretrained names checkpoints
that a fresh machine does not have, and would be read back as done: it is dropped and trained again), unless a study
process is running on DST's folder (its pretraining or evaluation lock is held): then its rows waiting for their
evaluation are this machine's and are kept. DST is written under the lock the study processes take. A finished
entry of DST that differs from SRC's is kept. Whether a carried row still holds is decided by its settings key when
the study reads it back (a different recipe, seed or data path retrains it), so carrying is always safe. Sessions
run on fresh machines: at a session's end, carry the study folder's state into the repository; at the next start,
copy that into the new study folder. `--rename` carries a row under another name (e.g. an ablation row of one
study that is a run of another: the settings key holds no row name, so it is read back by its settings).
"""

from __future__ import annotations

if not __package__:  # run as `python benchmarks/carry_study_state.py`: see benchmarks/_checkout.py
    import _checkout  # noqa: F401

import json
from pathlib import Path

from benchmarks.study.config import StudyError
from benchmarks.study.state import StudyState, carry_finished, roles_running
from mae_et.cli import OneLineParser, run_user_command


def read_state(path: Path, missing_ok: bool) -> dict:
    if not path.is_file():
        if missing_ok:
            return {"runs": {}, "launches": {}}
        raise StudyError(f"{path}: no such state.json; give a study folder's state.json (runs/study/<name>/)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"{path} is not a study state (not JSON: {e}); give a study folder's state.json") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise StudyError(f"{path} is not a study state (no 'runs'); give a study folder's state.json")
    data.setdefault("launches", {})
    return data


def carry(src: Path, dst: Path, rows: list[str] | None, rename: dict[str, str] | None = None) -> dict[str, list[str]]:
    if src.resolve() == dst.resolve():
        raise StudyError(f"SRC and DST are the same file ({src}); give the study folder's state and another path")
    source = read_state(src, missing_ok=False)
    read_state(dst, missing_ok=True)  # a DST that is no study state: one line, nothing written
    dst.parent.mkdir(parents=True, exist_ok=True)
    running = roles_running(dst.parent)
    if running:
        print(f"{dst.parent} is in use by a running study ({', '.join(running)}): its unfinished rows are kept")
    with StudyState(dst).locked() as target:  # the study processes' own lock: none of their writes is lost
        said = carry_finished(source, target, rows, keep_unfinished=bool(running), rename=rename)
    for what in ("carried", "dropped", "kept"):
        why = {"dropped": " (only pretrained: trained again)", "kept": " (DST's own finished entry differs)"}
        print(f"{what}{why.get(what, '')}: {', '.join(said[what]) or 'none'}")
    return said


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the state.json to carry from")
    parser.add_argument("dst", type=Path, help="the state.json to carry into (made if missing)")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows (default: every row)")
    parser.add_argument(
        "--rename", nargs="+", default=[], metavar="OLD=NEW", help="carry row OLD of SRC as row NEW of DST"
    )
    args = parser.parse_args(argv)
    rename = {}
    for pair in args.rename:
        old, eq, new = pair.partition("=")
        if not (old and eq and new) or old in rename:
            parser.error(f"--rename {pair}: give OLD=NEW row names, each OLD once (e.g. etpp_half_extent=etpp_x_b050)")
        rename[old] = new
    return run_user_command(lambda: carry(args.src, args.dst, args.rows, rename))


if __name__ == "__main__":
    main()
