"""How an exception from a library is quoted inside our own error messages."""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters, or `Type` when the message is blank.

    Library messages can run to pages (a pickle error, a JSON parser's context); one line is enough
    to say what went wrong next to the file name we add."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
