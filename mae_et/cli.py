"""The one command-line front every entry point shares: how arguments are parsed, how a user error is printed.

Every entry point (`pretrain.py`, `finetune/finetune.py`, `finetune/linprobe.py`, the `mae-et` tools, the study and
the benchmark scripts) parses with `OneLineParser` and runs its work through `run_user_command`, so they all end the
same way:
- a user error (any `mae_et.errors.UserError`: bad config, bad data folder, unreadable checkpoint, a run folder
  another run holds, an output that may not be written; or a bad argument): one line `error: ...`, exit 2;
- a run that stopped for a reason the user can act on (`RunStopped`: non-finite losses exit 1, Ctrl-C exit 130):
  its own line and exit status;
- anything else is a bug and keeps its traceback.

A leaf (it imports only `mae_et.errors`), so that commands in every layer can use it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from mae_et.errors import RunStopped, UserError

USER_ERROR_EXIT = 2  # what argparse uses for a bad argument; every user error exits with it


def say_error(message: str) -> NoReturn:
    """The one way a user error ends a command: `error: <message>` on stderr, one line, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported like every other user error: one line (argparse's own message and
    where the usage is), exit 2, instead of the usage block and then the message."""

    def error(self, message: str) -> NoReturn:
        say_error(f"{message} (see {self.prog} --help)")


def parse_args(argv: Sequence[str] | None, description: str, default_config: str | None) -> argparse.Namespace:
    """`--config recipe.yaml key=value ...`: the command line of the three training entry points."""
    parser = OneLineParser(
        description=description,
        epilog="Overrides are dotted keys, e.g. data.root=/data/imagenet train.epochs=5 curriculum.schedule=et",
    )
    parser.add_argument("--config", default=default_config, help=f"recipe YAML (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def run_user_command(fn: Callable[[], object], also: tuple[type[BaseException], ...] = ()) -> object:
    """Run a command's work; `also`: further exception types that are the user's to fix in this command (an
    unwritable output path's OSError, say). Returns what `fn` returns."""
    try:
        return fn()
    except (UserError, *also) as e:
        say_error(str(e))
    except RunStopped as e:
        if e.say:  # the main rank; the others stop quietly
            print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before a run started (a data scan, a config load): nothing to resume yet
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)


def check_checkout(script: str) -> None:
    """A script that sits in a checkout (`finetune/finetune.py`) imports the installed `mae_et`, not a sys.path
    entry of its own: when the installed copy is another checkout's (an editable install of a second clone or
    worktree), the script would run that checkout's code under this one's name. Say so in one line instead."""
    here = Path(script).resolve().parents[1]
    package = Path(__file__).resolve().parents[1]
    if (here / "mae_et").is_dir() and here != package:
        say_error(
            f"{script} is in the checkout {here}, but Python imports mae_et from {package}; install this checkout "
            f"(pip install -e {here}) or run with PYTHONPATH={here}"
        )
