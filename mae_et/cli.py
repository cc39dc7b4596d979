"""Shared command-line front for the entry points: `--config recipe.yaml key=value ...`.

User errors (bad config, bad data folder, unreadable checkpoint, a run folder another run holds, an output
that may not be written) print one line and exit 2, instead of a traceback. A run that stopped for a reason
the user can act on (non-finite losses: exit 1; Ctrl-C: exit 130) prints its own line. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mae_et.checkpoint import CheckpointError
from mae_et.data.folder import DataError
from mae_et.files import FileError
from mae_et.models.vit import LoadError
from mae_et.recipes import ConfigError
from mae_et.train.run import RunStopped

USER_ERRORS = (ConfigError, DataError, CheckpointError, LoadError, FileError)


def parse_args(argv: Sequence[str] | None, description: str, default_config: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides are dotted keys, e.g. data.root=/data/imagenet train.epochs=5 curriculum.schedule=et",
    )
    parser.add_argument("--config", default=default_config, help=f"recipe YAML (default: {default_config})")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def run_user_command(fn: Callable[[], object]) -> None:
    try:
        fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as e:
        if e.say:  # the main rank; the others stop quietly
            print(str(e), file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # before a run started (a data scan, a config load): nothing to resume yet
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)
