"""The sweep directory, RUN_DIR/sweep/: its file names, who may write into it, and every write and read of its files.

    RUN_DIR/sweep/
      recipe.yaml               the swept recipe, resolved: written first; a resume must match it
      candidates/ID/            each measurement's recipe, fitted as a tl run
      rows/ID.json              a measurement's result, written when its fit finished
      table.txt                 the table `tl sweep` prints
      accuracy_vs_depth.png     val accuracy per boundary, one line per measurement
      recommended.yaml          the winner's recipe; it trains into RUN_DIR/recommended/
      sweep.json                written last: its presence marks a finished sweep
      sweep.lock                flock-ed by the sweep writing here

RUN_DIR is tl's like a run directory (its marker; a new directory gets one);
the sweep writes nothing else in it, so a fit into the same output_dir and the
sweep do not touch each other's files. `--force` removes only these names.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from tlcli import __version__
from tlcli.errors import RunError
from tlcli.files import atomic_write, file_lock, write_json_atomic
from tlcli.run.records import parse_record
from tlcli.run.rundir import MARKER, RunDir

SWEEP = "sweep"
RECIPE = "recipe.yaml"
CANDIDATES = "candidates"
ROWS = "rows"
TABLE = "table.txt"
PICTURE = "accuracy_vs_depth.png"
RECOMMENDED = "recommended.yaml"
RESULT = "sweep.json"
LOCK = "sweep.lock"
OWNED = (RECIPE, CANDIDATES, ROWS, TABLE, PICTURE, RECOMMENDED, RESULT)
RECOMMENDED_RUN = "recommended"  # RUN_DIR/recommended/: where the recommended recipe trains


class SweepRow(BaseModel):
    """One measurement, as rows/ID.json holds it (parsed with bounds when a sweep resumes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: str = Field(min_length=1, max_length=600)
    kind: Literal["probe", "multi-depth", "unfreeze"]
    boundary: str = Field(min_length=1, max_length=10_000)
    trainable_params: int = Field(ge=0, le=10**13)
    cache_bytes: int = Field(ge=0, le=1 << 50)
    val_acc: float = Field(ge=0, le=1)
    # A probe's accuracy cross-validated over train+val (5 folds), at its L2; None for the unfreeze rows.
    cv_acc: Optional[float] = Field(default=None, ge=0, le=1)
    l2: Optional[float] = Field(default=None, ge=0, le=10)  # a probe's L2, chosen on val
    seconds: float = Field(ge=0, le=10**8)
    recipe_text: str = Field(max_length=1_000_000)  # the candidate's recipe: a row of another recipe is not reused


class SweepDir:
    """RUN_DIR/sweep/ on disk."""

    def __init__(self, run_dir: str | Path):
        self.run = RunDir(run_dir)
        self.path = self.run.path / SWEEP

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def candidate_dir(self, cid: str) -> Path:
        return self.path / CANDIDATES / cid

    @property
    def recommended_run(self) -> Path:
        return self.run.path / RECOMMENDED_RUN

    def finished(self) -> bool:
        return (self.path / RESULT).is_file()

    def check(self, recipe_text: str, force: bool, resume: bool, recipe_file: Optional[Path]) -> None:
        """Writing nothing: whether the sweep may use this directory (fit's rules, for a sweep)."""
        if recipe_file is not None and recipe_file.is_file():
            holders = (recipe_file.resolve().parent, *recipe_file.resolve().parents)
            if self.run.path.resolve() in holders:
                raise RunError(f"{self.run.path} holds this recipe file; the sweep would write beside it: choose an "
                               "output_dir of its own (e.g. runs/NAME)")
        if self.run.foreign():
            raise RunError(f"{self.run.path} is not a tl run directory (no {MARKER}); tl only writes into its own: "
                           "choose another output_dir, or empty this one")
        self.check_state(recipe_text, force, resume)

    def check_state(self, recipe_text: str, force: bool, resume: bool) -> None:
        """A finished sweep is kept without --force; an interrupted one is resumed or started over."""
        started = (self.path / RECIPE).is_file()
        if resume:
            if self.finished():
                raise RunError(f"{self.path} holds a finished sweep; nothing to resume (pass --force to sweep again)")
            if not started:
                raise RunError(f"{self.path}: no interrupted sweep to resume; run tl sweep without --resume")
            if (self.path / RECIPE).read_text(encoding="utf-8") != recipe_text:
                raise RunError(f"{self.path}: the recipe changed since this sweep started; resume needs the same "
                               "recipe (pass --force to start over)")
        elif not force:
            if self.finished():
                raise RunError(f"{self.path} already holds a finished sweep; pass --force to sweep again")
            if started:
                raise RunError(f"{self.path} holds an interrupted sweep; pass --resume to continue it or --force "
                               "to start over")

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path / LOCK, wait=False) as mine:
            if not mine:
                raise RunError(f"{self.path}: another tl sweep is writing here; wait for it, or choose another output_dir")
            yield

    def start(self, recipe_text: str, resume: bool) -> None:
        """The run directory made tl's if it is new; a fresh sweep's own old files removed."""
        if not self.run.is_run():
            write_json_atomic(self.run.path / MARKER, {"tl_version": __version__}, commit=True)
        if resume:
            return
        for name in OWNED:
            path = self.path / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        atomic_write(self.path / RECIPE, recipe_text.encode("utf-8"), commit=True)

    def row(self, cid: str, recipe_text: str) -> Optional[SweepRow]:
        """A finished measurement of this very recipe, or None (missing, or another recipe's)."""
        path = self.path / ROWS / f"{cid}.json"
        if not path.is_file():
            return None
        row = parse_record(SweepRow, path)
        return row if row.recipe_text == recipe_text else None

    def save_row(self, row: SweepRow) -> None:
        (self.path / ROWS).mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path / ROWS / f"{row.id}.json", row.model_dump(mode="json"), commit=True)

    def write_text(self, name: str, text: str) -> Path:
        (self.path / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / name, text.encode("utf-8"))
        return self.path / name

    def finish(self, result: dict) -> None:
        write_json_atomic(self.path / RESULT, result, commit=True)

    def result(self) -> dict:
        return json.loads((self.path / RESULT).read_text(encoding="utf-8"))
