"""Text for people: any name made printable (whatever bytes it was read from) and short enough for a message. Imports no torch.

A file or folder name that is not UTF-8 reaches Python as a string with lone
surrogates; it is kept as is wherever it names a file (it is the file's
bytes), and shown through `printable` wherever a person reads it (a terminal,
a picture, a web page), with U+FFFD for each byte that is not text.
"""

from __future__ import annotations


def printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def shortened(text: str, limit: int = 80) -> str:
    """A user's text in a message: printable, and cut to `limit` characters."""
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
