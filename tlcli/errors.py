"""Errors: the user's to fix, each a readable line; anything else is our bug.

Anything raised as a `TLError` is printed by the CLI as plain lines with exit
code 1 and no traceback. Every other exception is our bug and keeps its
traceback. The engine raises; only the CLI prints or exits.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from typing import Iterable, Iterator


class TLError(Exception):
    """A problem with the user's input, data or environment."""


@dataclass(frozen=True)
class Problem:
    """One recipe problem, located at a line of the recipe file."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class RecipeError(TLError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SpecError(TLError):
    """Problems found below the layer that holds the recipe, each at a dotted
    location in it (`("surgery", 2, "add", "inputs", 0)`). The layer that
    holds the recipe turns them into `file:line` problems (`Recipe.located`)."""

    def __init__(self, issues: Iterable[tuple[tuple, str]]):
        self.issues = list(issues)
        super().__init__("\n".join(f"{'.'.join(map(str, loc))}: {message}" for loc, message in self.issues))


class DataError(TLError):
    """A data set that cannot be read: no images, an unreadable file, a failed download."""


class WeightsError(TLError):
    """Pretrained weights that cannot be found, verified or loaded."""


class OutputError(TLError):
    """An output the user named (`-o PATH`, `tl recipes cp DEST`) that tl will not write over."""


class ResourceError(TLError):
    """The machine ran out of something the recipe asked for (memory): what, and what to lower."""


class RunError(TLError):
    """A run directory in a state the command refuses to touch (missing, finished, foreign)."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean 'x'?)' for the closest names, or '' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    if not close:
        # Names of deep layers differ by a suffix ('blocks.5' vs 'blocks.5.0'); a
        # prefix match is a better hint than nothing.
        close = [c for c in choices if c.startswith(word) or word.startswith(c)][-n:]
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"


def _is_out_of_memory(err: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA) subclasses RuntimeError; the CPU allocator raises a plain
    # RuntimeError that says "can't allocate memory"; Python's own allocations raise MemoryError.
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "CUDA out of memory" in text)


@contextlib.contextmanager
def out_of_memory(what: str, advice: str) -> Iterator[None]:
    """Running out of memory inside the block is one line: `what` was being done, the size
    that failed, and `advice` (what in the recipe to lower), not a traceback."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        m = re.search(r"allocate (\d+) bytes", str(err)) or re.search(r"allocate ([\d.]+ [KMGT]iB)", str(err))
        size = (f" ({int(m.group(1)) / 2**30:.1f} GiB at once)" if m.group(1).isdigit() else f" ({m.group(1)} at once)") if m else ""
        raise ResourceError(f"out of memory while {what}{size}; {advice}") from None
