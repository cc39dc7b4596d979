"""Warnings a person can read: one line that says what and why, not the source line of the call.

Python prints a warning as `file.py:347: UserWarning: <message>` followed by the source line of the
`warnings.warn(...)` call, which tells a user nothing. Our warnings are of the categories below, and
`one_line_warnings()` (run when `mae_et` is imported, so DataLoader workers get it too) prints just
`warning: <message>` for them; every other library's warnings keep Python's format. They are still
ordinary warnings: filters, `-W error` and `pytest.warns` see them as usual.
"""

from __future__ import annotations

import warnings


class MaeEtWarning(UserWarning):
    """Every warning mae_et gives."""


class DataWarning(MaeEtWarning):
    """A file skipped (named, with the reason) or a data folder that looks wrong."""


class RunWarning(MaeEtWarning):
    """Something about the run: a checkpoint passed over, a tracker missing, a setting ignored."""


def one_line_warnings() -> None:
    python_format = warnings.formatwarning
    if getattr(python_format, "mae_et_one_line", False):
        return  # already installed

    def format_warning(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, MaeEtWarning):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    format_warning.mae_et_one_line = True
    warnings.formatwarning = format_warning
