"""The one command front of every entry point: how arguments are parsed, how a user error ends a command.

A user error (`mae_et.errors.UserError`, or a bad argument) is one line `error: ...`, exit 2; a run that stopped
for a reason the user can act on (`RunStopped`) says its own line and exit status; anything else keeps its
traceback. `mae-et launch` keeps that one line under `accelerate launch`, in one process or several. A leaf (it
imports only `mae_et.errors`), so commands in every layer can use it (docs/design.md, "One command front").
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from mae_et.errors import RunStopped, UserError

USER_ERROR_EXIT = 2  # what argparse uses for a bad argument; every user error exits with it
END_MARK = "MAE_ET_END_MARK"  # set by `mae-et launch` for the processes it starts: see end()
# taken out of the environment: it is for this process (one the launcher started), not for those it starts itself
_end_mark = os.environ.pop(END_MARK, None)


def end(line: str, code: int, say: bool = True) -> NoReturn:
    """End the command: `line` on stderr (when `say`: a run's stop line is said by its main rank) and exit status
    `code`. Under `mae-et launch` (END_MARK set) the line goes to the front instead, after the mark, in one write: the
    front prints the first one alone, with its exit status, in place of the launcher's report of failed processes."""
    if say and _end_mark:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"{_end_mark}{code} {line}\n".encode(errors="replace"))
    elif say:
        print(line, file=sys.stderr)
    sys.exit(code)


def say_error(message: str) -> NoReturn:
    """The one way a user error ends a command: `error: <message>` on stderr, one line, exit 2."""
    end(f"error: {message}", USER_ERROR_EXIT)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported like every other user error: one line (argparse's own message and
    where the usage is), exit 2, instead of the usage block and then the message."""

    def error(self, message: str) -> NoReturn:
        say_error(f"{message} (see {self.prog} --help)")


def parse_args(argv: Sequence[str] | None, description: str, default_config: str | None) -> argparse.Namespace:
    """`--config recipe.yaml key=value ...`: the command line of the three training scripts."""
    parser = OneLineParser(
        description=description,
        epilog="Overrides are dotted keys, e.g. data.root=/data/imagenet train.epochs=5 curriculum.schedule=et",
    )
    parser.add_argument("--config", default=default_config, help=f"recipe YAML (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    warn_if_one_of_several_processes()
    return args


def warn_if_one_of_several_processes() -> None:
    """`accelerate launch --num_processes 2` without `--multi_gpu` starts one process and says nothing: say so.
    (Its plain launcher sets MASTER_PORT only when asked for several; one of several has a world size.)"""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by every accelerate launcher
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if launched and "MASTER_PORT" in os.environ and not any(v in os.environ for v in sizes):
        print(
            "warning: accelerate launch was asked for more than one process (--num_processes or --num_machines) "
            "but without --multi_gpu starts only this one: the run goes on as one process; add --multi_gpu to start "
            "them all",
            file=sys.stderr,
        )


def run_user_command(fn: Callable[[], object], also: tuple[type[BaseException], ...] = ()) -> object:
    """Run a command's work and return what `fn` returns; `also`: further exception types that are the user's to
    fix in this command (an unwritable output path's OSError, say)."""
    try:
        return fn()
    except (UserError, *also) as e:
        say_error(str(e))
    except RunStopped as e:
        end(str(e), e.exit_code, say=e.say)  # said by the main rank; the others stop quietly
    except KeyboardInterrupt:  # before a run started (a data scan, a config load): nothing to resume yet
        end("interrupted before the run started; nothing was written", 130)


def check_checkout(script: str) -> None:
    """A script in a checkout's sub-folder (`finetune/finetune.py`) imports the installed `mae_et`: refuse, in one
    line, one whose installed copy is another checkout's (it would run that code under this one's name)."""
    here = Path(script).resolve().parents[1]
    package = Path(__file__).resolve().parents[1]
    if (here / "mae_et").is_dir() and here != package:
        say_error(
            f"{script} is in the checkout {here}, but Python imports mae_et from {package}; install this checkout "
            f"(pip install -e {here}) or run with PYTHONPATH={here}"
        )


def run_training_script(
    description: str,
    default_config: str,
    load: Callable[[str, list[str]], object],
    work: Callable[[object], object],
    script: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """A training script's whole command: `--config RECIPE key=value ...`, the recipe read by `load` and run by
    `work`, a user error in one line. `script`: a script below the checkout root, checked by `check_checkout`."""
    if script is not None:
        check_checkout(script)
    args = parse_args(argv, description, default_config)
    run_user_command(lambda: work(load(args.config, args.overrides)))


LAUNCH_USAGE = "mae-et launch [accelerate launch options] SCRIPT [script arguments]"


def launch(argv: Sequence[str]) -> NoReturn:
    """`mae-et launch ...`: `accelerate launch --quiet ...`, its stderr copied through up to the first end line a
    process hands over (`end`); that line alone is printed and gives the exit status, else the launcher's does."""
    if not argv:
        say_error(f"the training script is missing: {LAUNCH_USAGE}")
    if argv[0] in ("-h", "--help"):
        print(
            f"usage: {LAUNCH_USAGE}\n\naccelerate launch, with a user error of the script (or a run's stop) ended "
            "in its one line and exit status, in one process or several. The options are accelerate launch's "
            "(accelerate launch --help); e.g. mae-et launch --multi_gpu --num_processes 8 pretrain.py --config "
            "RECIPE data.root=/data/imagenet"
        )
        sys.exit(0)
    mark = f"mae-et-end-{secrets.token_hex(8)}:"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--quiet", *argv],
        env={**os.environ, END_MARK: mark},
        stderr=subprocess.PIPE,
    )
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches the launcher's process group too: wait for it
    signal.signal(signal.SIGTERM, lambda signum, _: launcher.send_signal(signum))  # a scheduler's stop: passed on
    ended: list[tuple[int, str]] = []
    copier = threading.Thread(target=_copy_until_end, args=(launcher.stderr, mark.encode(), ended), daemon=True)
    copier.start()
    code = launcher.wait()
    copier.join(timeout=10)  # a descendant that outlives the launcher may hold the pipe open
    if ended:
        code, line = ended[0]
        print(line, file=sys.stderr)
    sys.exit(code)


def _copy_until_end(stream, mark: bytes, ended: list) -> None:
    """Copy `stream` to stderr as it comes, up to the first `mark`; the line after it (`<status> <line>`) goes into
    `ended` and the rest of the stream is dropped."""
    out = sys.stderr.buffer
    held = b""
    while chunk := stream.read1(1 << 16):
        held += chunk
        at = held.find(mark)
        if at >= 0:
            out.write(held[:at])
            out.flush()
            rest = held[at + len(mark) :]
            while b"\n" not in rest and (chunk := stream.read1(1 << 16)):
                rest += chunk
            code, _, line = rest.split(b"\n", 1)[0].decode(errors="replace").rstrip("\r").partition(" ")
            ended.append((int(code), line))
            while stream.read1(1 << 16):  # the launcher's report of the processes that ended
                pass
            return
        keep = next((k for k in range(len(mark) - 1, 0, -1) if held.endswith(mark[:k])), 0)  # a mark cut in two
        out.write(held[: len(held) - keep])
        out.flush()
        held = held[len(held) - keep :]
    out.write(held)
    out.flush()
