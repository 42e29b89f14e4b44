"""A run's records: the JSON files a run directory holds, each a schema with bounds. Imports no torch.

`checkpoint.json` (CheckpointMeta), `resume/state.json` (ResumeState) and the
per-stage summaries they carry are parsed with these models when read back,
so a damaged or tampered file is one line that names it, never a traceback
and never a silently different run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tlcli import __version__
from tlcli.errors import RunError
from tlcli.model.preprocess import Preprocess


class _Record(BaseModel):
    # Read back from disk: bounded, and never NaN or inf (json.loads accepts both).
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


Count = Annotated[int, Field(ge=0, le=10**9)]


class StageSummary(_Record):
    """What one finished stage did."""

    name: str
    input: Literal["cache", "images"]
    frontier: list[str]
    epochs_run: Count
    best_epoch: Optional[Count] = None
    trainable_params: Count
    optimizer: Optional[str] = None  # what `auto` resolved to
    l2: Optional[Annotated[float, Field(gt=0, le=1e6)]] = None  # the probe fit's L2, when chosen on val
    refit_rows: Optional[Count] = None  # the probe refitted on train + val: their rows


class ResumeState(_Record):
    """The last finished epoch of an interrupted run (epoch 0: the stage has not started)."""

    stage: Count
    epoch: Count
    rows: Count
    best_value: Optional[float] = None
    best_epoch: Count = 0
    bad_epochs: Count = 0
    stopped: bool = False
    summaries: list[StageSummary] = []
    files: dict[Literal["model", "best", "optim"], str] = {}
    # The model file holds only tensors some stage trains; this hash pins the rest
    # (rebuilt from the recipe on resume) so that changed base weights are noticed.
    frozen_hash: Optional[str] = None
    l2: Optional[Annotated[float, Field(gt=0, le=1e6)]] = None  # the probe fit's L2, chosen once per stage
    precision: Optional[Literal["fp32", "bf16"]] = None  # what the run trained at: a resume must match it

    def problems(self, stages: list[tuple[str, int]], logged: list[dict]) -> list[str]:
        """What in this state the run cannot have written: `stages` are the recipe's
        (name, epochs), `logged` the rows of metrics.jsonl. Empty when it is consistent."""
        found = []
        if self.stage > len(stages):
            return [f"stage {self.stage} of a recipe with {len(stages)} stage(s)"]
        if len(self.summaries) != self.stage:
            found.append(f"{len(self.summaries)} finished stage(s) recorded at stage {self.stage}")
        for i, (summary, (name, epochs)) in enumerate(zip(self.summaries, stages)):
            if summary.name != name or not 1 <= summary.epochs_run <= epochs:
                found.append(f"stage {i + 1} recorded as {summary.name!r} with {summary.epochs_run} epochs "
                             f"(the recipe: {name!r}, at most {epochs})")
        limit = stages[self.stage][1] if self.stage < len(stages) else 0
        if self.epoch > limit:
            found.append(f"epoch {self.epoch} of a stage with {limit} epoch(s)")
        if self.best_epoch > self.epoch or self.bad_epochs > self.epoch:
            found.append(f"best epoch {self.best_epoch} / bad epochs {self.bad_epochs} after epoch {self.epoch}")
        expected = sum(s.epochs_run for s in self.summaries) + self.epoch
        if self.rows != expected:
            found.append(f"rows {self.rows}, but the stages so far ran {expected} epoch(s)")
        elif len(logged) < self.rows:
            found.append(f"metrics.jsonl has {len(logged)} row(s), the state {self.rows}")
        if "model" not in self.files or (self.epoch > 0 and "optim" not in self.files):
            found.append(f"the files it names ({', '.join(self.files) or 'none'}) lack the model or the optimizer")
        return found


class CheckpointMeta(_Record):
    """`checkpoint.json`: what rebuilds the model offline beside its weights."""

    model: str
    head_layer: Optional[str]
    class_names: list[str] = Field(min_length=2, max_length=1_000_000)
    preprocess: Preprocess
    frontier: list[str]
    cache_key: Optional[str]
    data_fingerprint: str
    stages: list[StageSummary]
    frozen_modules: list[str]
    frozen_attrs: list[str] = []
    skipped_images: list[str] = []  # undecodable files left out (data.on_bad_image: skip)
    decoder: Optional[str] = None  # what decoded the training JPEGs (nvjpeg and libjpeg-turbo differ by +-1)
    # The arithmetic the frozen part (and image stages) trained at: evaluate and predict use it
    # (a run saved before tl recorded it ran in fp32).
    precision: Literal["fp32", "bf16"] = "fp32"
    tl_version: str = __version__

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a class name appears twice")
        return names


def parse_record(model: type[BaseModel], path: Path) -> Any:
    """A run's JSON file parsed with its schema; a damaged one is a RunError naming the file."""
    try:
        return model.model_validate(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: cannot read: {err}") from None
    except (ValueError, ValidationError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) + ": " + first["msg"] if first else str(err)
        raise RunError(f"{path}: damaged ({where}); fit the run again with --force") from None
