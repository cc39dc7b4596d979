"""The two kinds of stop every entry point reports the same way (`mae_et.cli.run_user_command`).

`UserError`: something the user can fix (a config key, a data folder, a checkpoint, an output path), one line
`error: ...`, exit 2; every stage's own error derives from it, so no stage imports another to catch it.
`RunStopped`: a run that stopped early for a reason the user can act on, with its own line and exit status.
A leaf: it imports nothing of the package, so every layer may raise these.
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
