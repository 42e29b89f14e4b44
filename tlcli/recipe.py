"""The recipe: YAML in, a validated `Recipe` out. Imports no torch.

Validation gathers every problem at once and reports each as
`recipe.yaml:LINE: dotted.path: message`. Line numbers come from the YAML
node tree, so a problem points at the key the user wrote (or, for a missing
key, at the section that lacks it).
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from tlcli.errors import Problem, RecipeError, TLError, did_you_mean


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsSpec(Strict):
    """Where the pretrained weights come from.

    Written as a string (`embedded`, `none`, or a torchvision weight enum such as
    `ResNet18_Weights.IMAGENET1K_V1` / `DEFAULT`) or as `{file: PATH, sha256: HEX}`.
    """

    name: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hexadecimal characters")
        return value.lower() if value else value

    @model_validator(mode="after")
    def _one_source(self) -> "WeightsSpec":
        if (self.name is None) == (self.file is None):
            raise ValueError("give either a name (embedded, none, an enum) or {file: PATH}")
        if self.sha256 and not self.file:
            raise ValueError("sha256 only applies to {file: PATH}")
        return self

    @property
    def is_random(self) -> bool:
        return self.name == "none"

    def describe(self) -> str:
        return self.name if self.name else f"file:{self.file}"


class BaseSpec(Strict):
    zoo: Literal["timm", "torchvision", "tl"]
    model: str = Field(min_length=1)
    weights: WeightsSpec
    # Only the spatial size can be overridden (smoke runs on small images); mean,
    # std and interpolation always come from the model's own config.
    input_size: Optional[int] = Field(default=None, ge=8, le=1024)


class SplitSpec(Strict):
    """A seeded, stratified split, used when the data is not pre-split on disk."""

    val: float = Field(default=0.1, ge=0.0, lt=1.0)
    test: float = Field(default=0.2, gt=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _room_to_train(self) -> "SplitSpec":
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves too little to train on")
        return self


class DataSpec(Strict):
    dataset: Optional[Literal["digits", "flowers"]] = None
    imagefolder: Optional[str] = None
    # Where `dataset: flowers` downloads from; tests point it at a local server.
    url: Optional[str] = None
    split: SplitSpec = SplitSpec()
    # Keep only these classes (by name), in this order: e.g. digits 0-4.
    classes: Optional[list[str]] = None
    # Stratified subsample of this many images before splitting, for smoke runs.
    limit: Optional[int] = Field(default=None, ge=10)
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=0, ge=0)

    @field_validator("classes", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.dataset is None) == (self.imagefolder is None):
            raise ValueError("give exactly one of 'dataset: digits|flowers' or 'imagefolder: PATH'")
        if self.url and self.dataset != "flowers":
            raise ValueError("'url' only applies to 'dataset: flowers'")
        return self


class FreezeSpec(Strict):
    """DL4J's setFeatureExtractor: the named node(s) and everything upstream are frozen."""

    until: Optional[Union[str, list[str]]] = None

    @property
    def nodes(self) -> list[str]:
        if self.until is None:
            return []
        return [self.until] if isinstance(self.until, str) else list(self.until)


class HeadSpec(Strict):
    """The classifier that is replaced by a new layer sized to the data's classes."""

    layer: str = "auto"
    init: Literal["xavier", "kaiming", "normal"] = "xavier"


class FineTuneSpec(Strict):
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0)
    # Norm weights and biases usually take no weight decay (timm, fastai do the same).
    decay_norm_and_bias: bool = False
    # The learning-rate schedule, stepped every batch; warmup ramps linearly from 0.
    schedule: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: float = Field(default=0.0, ge=0)
    step_epochs: int = Field(default=10, ge=1)  # schedule: step — multiply by step_gamma every step_epochs
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(default=None, gt=0)  # max global grad norm
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "FineTuneSpec":
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer: sgd with momentum > 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than epochs ({self.epochs})")
        return self


class CacheSpec(Strict):
    dir: str = ".tl-cache"
    # float32 keeps cached features bit-comparable with the full model;
    # bfloat16 runs the frozen part under autocast and halves the cache.
    dtype: Literal["float32", "bfloat16"] = "float32"
    shard_size: int = Field(default=1024, ge=1)


class Recipe(Strict):
    base: BaseSpec
    data: DataSpec
    freeze: FreezeSpec = FreezeSpec()
    head: HeadSpec = HeadSpec()
    fine_tune: FineTuneSpec = FineTuneSpec()
    cache: CacheSpec = CacheSpec()
    device: str = "auto"
    output_dir: str

    _source: Optional["RecipeSource"] = PrivateAttr(default=None)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @property
    def source(self) -> "RecipeSource":
        return self._source or RecipeSource("<recipe>", None)

    def problem(self, loc: tuple, message: str) -> Problem:
        """A problem found after schema validation (e.g. an unknown layer), at its line."""
        return self.source.problem(loc, message)


class RecipeSource:
    """The recipe file and its YAML node tree, to turn a dotted path into a line."""

    def __init__(self, name: str, root: Optional[yaml.Node]):
        self.name = name
        self.root = root

    def line_of(self, loc: tuple) -> Optional[int]:
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        line, node = key.start_mark.line + 1, value
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def problem(self, loc: tuple, message: str) -> Problem:
        return Problem(self.name, self.line_of(loc), ".".join(str(p) for p in loc), message)


def load_recipe(path: str | Path) -> Recipe:
    """Read, parse and validate a recipe; raise `TLError`/`RecipeError` for the user."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TLError(f"{path}: recipe file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise TLError(f"{path}: cannot read recipe: {err}") from None
    return parse_recipe(text, name=str(path))


def parse_recipe(text: str, name: str = "recipe.yaml") -> Recipe:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError([Problem(name, line, "", f"YAML syntax error: {err.problem or err}")]) from None
    except yaml.YAMLError as err:
        raise RecipeError([Problem(name, None, "", f"YAML error: {err}")]) from None
    source = RecipeSource(name, root)
    if not isinstance(data, dict):
        raise RecipeError([Problem(name, 1, "", "a recipe is a YAML mapping with base, data, output_dir, ...")])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_problems(err, source)) from None
    recipe._source = source
    return recipe


def _problems(err: ValidationError, source: RecipeSource) -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1])
            fields = _field_names(loc[:-1])
            message = f"unknown key '{key}'{did_you_mean(key, fields)}"
            if not did_you_mean(key, fields):
                message += f" (expected one of: {', '.join(fields)})"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error":
            choices = _literal_choices(loc)
            message = f"{e['input']!r} is not one of {', '.join(choices)}{did_you_mean(str(e['input']), choices)}"
        elif kind == "value_error":
            message = str(e["ctx"].get("error", e["msg"]))
        else:
            message = e["msg"]
        problems.append(source.problem(loc, message))
    problems.sort(key=lambda p: (p.line or 0, p.path))
    return problems


def _annotation_at(loc: tuple) -> Any:
    """The type annotation at a dotted path through the Recipe model, or None."""
    annotation: Any = Recipe
    for part in loc:
        model = _model_in(annotation)
        if model is None or str(part) not in model.model_fields:
            if isinstance(part, int):
                continue  # a list index: stay on the list's item type
            return None
        annotation = model.model_fields[str(part)].annotation
    return annotation


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _field_names(loc: tuple) -> list[str]:
    model = _model_in(_annotation_at(loc))
    return list(model.model_fields) if model else []


def _literal_choices(loc: tuple) -> list[str]:
    annotation = _annotation_at(loc)
    found: list[str] = []

    def walk(a: Any) -> None:
        if typing.get_origin(a) is Literal:
            found.extend(str(x) for x in typing.get_args(a))
        elif typing.get_origin(a) in (Union, types.UnionType):
            for arg in typing.get_args(a):
                walk(arg)

    walk(annotation)
    return found


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in), as saved into a run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
