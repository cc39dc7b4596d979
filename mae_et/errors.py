"""The two kinds of stop every entry point reports the same way (`mae_et.cli.run_user_command`).

`UserError`: bad input or a state the user can fix (a config key, a data folder, a checkpoint, an output path);
each stage's own error (ConfigError, DataError, CheckpointError, LoadError, FileError, the study's StudyError)
derives from it, so that one `except UserError` in the command front covers them all and no stage imports another
to be caught. Printed as one line, `error: <message>`, exit 2.

`RunStopped`: a run that stopped before its end for a reason the user can act on (non-finite losses, Ctrl-C); it
carries its own exit status and says its own line.

A leaf module: it imports nothing of the package, so every layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user must fix; the message is one line naming the problem and the fix."""


class RunStopped(Exception):
    """A run that stopped before its end for a reason the user can act on: one line (printed by the main
    rank only, `say`), and an exit status of its own."""

    exit_code = 1

    def __init__(self, message: str, say: bool = True) -> None:
        super().__init__(message)
        self.say = say
