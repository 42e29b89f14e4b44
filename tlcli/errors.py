"""Errors: the user's to fix, each a readable line; anything else is our bug.

Anything raised as a `TLError` is printed by the CLI as plain lines with exit
code 1 and no traceback. Every other exception is our bug and keeps its
traceback. The engine raises; only the CLI prints or exits.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


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
