"""The recipe's schema: the Recipe, made of the sections of `config.sections` and `config.training`. Imports no torch.

A Recipe remembers where it was read from (`source`), so that problems found
later, below, can be put at their line.
"""

from __future__ import annotations

import contextlib
import re
from typing import Literal, Optional

from pydantic import Field, PrivateAttr, field_validator

from tlcli.config.fields import DEVICE_PATTERN, Strict, UserPath, own_directory
from tlcli.config.sections import (AddSpec, BaseSpec, DataSpec, FreezeSpec, HeadSpec, InputSpec, NOutReplace, Operation,
                                   RemoveSpec, SplitSpec, WeightsSpec)
from tlcli.config.source import RecipeSource
from tlcli.config.training import (AugmentSpec, CacheSpec, CropSpec, DistributedSpec, EarlyStoppingSpec, FineTuneOverride,
                                   FineTuneSpec, JitterSpec, StageSpec, SweepSpec, TrackingSpec)
from tlcli.errors import Problem, RecipeError, SpecError

__all__ = ["Recipe", "AddSpec", "AugmentSpec", "BaseSpec", "CacheSpec", "CropSpec", "DataSpec", "DistributedSpec",
           "EarlyStoppingSpec", "FineTuneOverride", "FineTuneSpec", "FreezeSpec", "HeadSpec", "InputSpec", "JitterSpec",
           "NOutReplace", "Operation", "RemoveSpec", "SplitSpec", "StageSpec", "SweepSpec", "WeightsSpec"]


class Recipe(Strict):
    base: BaseSpec = Field(
                           description="The base model: a zoo model and its weights, or a finished tl run to continue from.")
    data: DataSpec = Field(description="The images, their labels and their split.")
    input: Optional[InputSpec] = Field(default=None,
                                       description="DL4J's input preprocessor: the model itself takes grey or small images and resizes them.")
    surgery: list[Operation] = Field(default=[],
                                     description="Graph edits (n_out_replace, remove, remove_output_layers, add, outputs), applied in order before freezing.")
    freeze: FreezeSpec = Field(default=FreezeSpec.model_validate("none"),
                               description="What is frozen: a boundary node (DL4J's setFeatureExtractor) or all but the last N weight layers; `none` trains everything.")
    head: HeadSpec = Field(default=HeadSpec(),
                           description="The classifier that is replaced by one sized to the data's classes.")
    fine_tune: FineTuneSpec = Field(default=FineTuneSpec(),
                                    description="How the trainable part trains: optimizer, rates, schedule, epochs, batch.")
    augment: Optional[AugmentSpec] = Field(default=None,
                                           description="Training-time augmentation; only for a recipe without stages that trains on images.")
    stages: list[StageSpec] = Field(default=[],
                                    description="Stages run in order, the model carried over; each may move the boundary and override fine_tune.")
    cache: CacheSpec = Field(default=CacheSpec(), description="Where and how the frozen part's outputs are cached.")
    distributed: DistributedSpec = Field(default=DistributedSpec(),
                                         description="How the run splits its work under torchrun.")
    tracking: TrackingSpec = Field(default=TrackingSpec(),
                                   description="Experiment trackers each fit logs to: tensorboard, mlflow, csv.")
    sweep: SweepSpec = Field(default=SweepSpec(), description="What `tl sweep` compares; read by tl sweep only.")
    device: str = Field(default="auto", description="auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="fp32", description="The frozen part's and image stages' arithmetic: bf16 autocast, fp32, or auto "
                                    "(bf16 on a GPU with bf16 and a CPU with AMX or AVX-512 BF16, else fp32).")
    output_dir: UserPath = Field(
                                 description="The run directory: tl writes only into an empty or new directory, or one that carries its marker.")

    _source: Optional["RecipeSource"] = PrivateAttr(default=None)

    @field_validator("output_dir")
    @classmethod
    def _a_directory_of_its_own(cls, value: str) -> str:
        return own_directory(value, "the run (e.g. runs/NAME)")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @property
    def source(self) -> "RecipeSource":
        return self._source or RecipeSource("<recipe>", None)

    def problem(self, loc: tuple, message: str) -> Problem:
        """A problem found after schema validation (e.g. an unknown layer), at its line."""
        return self.source.problem(loc, message)

    def locate(self, err: SpecError) -> RecipeError:
        """Located problems from a lower layer, as `file:line` problems of this recipe."""
        return RecipeError(dict.fromkeys(self.problem(loc, message) for loc, message in err.issues))

    @contextlib.contextmanager
    def located(self):
        """Turn a lower layer's `SpecError` into this recipe's `file:line` problems."""
        try:
            yield
        except SpecError as err:
            raise self.locate(err) from None
