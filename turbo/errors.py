"""Errors meant for users, and how an exception from a library is quoted inside them.

Every error a user can cause (a bad file, flag, image, dataset, a model that cannot be had) is a
`TurboError`; the entry points (the CLI, the app's handlers, the trainers, evaluate) catch that and
nothing else, so a bug keeps its traceback instead of passing for a user's mistake.
"""

from __future__ import annotations


class TurboError(ValueError):
    """Something the user can fix, said in one line (a ValueError, for code that catches those)."""


class SettingError(TurboError):
    """An option or argument outside what it accepts (a range, a choice)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters, or `Type` when the message is blank.

    Library messages can run to pages (a pickle error, a JSON parser's context); one line is enough
    to say what went wrong next to the file name we add."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
