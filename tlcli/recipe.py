"""The recipe: YAML in, a validated `Recipe` out. Imports no torch.

Validation gathers every problem at once and reports each as
`recipe.yaml:LINE: dotted.path: message`. Line numbers come from the YAML
node tree, so a problem points at the key the user wrote (or, for a missing
key, at the section that lacks it).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from tlcli.errors import Problem, RecipeError, SpecError, TLError, did_you_mean


class Strict(BaseModel):
    # No inf or nan anywhere: `lr: .inf` validated and then trained to NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `lr: true` as 1.0 and `epochs: yes` as 1: a number field takes numbers only.
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _is_numeric(field.annotation) and _has_boolean(value):
            raise ValueError(f"{str(_has_boolean(value)[0]).lower()} is a boolean; this takes a number")
        return value


def _is_numeric(annotation: Any) -> bool:
    """int or float somewhere in the annotation (through Optional, Union, Annotated, list,
    tuple, dict values), and no bool: the fields a boolean must not silently become."""
    found: set = set()

    def walk(a: Any) -> None:
        if a in (int, float, bool):
            found.add(a)
        elif isinstance(a, type) and issubclass(a, BaseModel):
            return  # a section validates its own fields
        for arg in typing.get_args(a):
            walk(arg)

    walk(annotation)
    return bool(found & {int, float}) and bool not in found


def _has_boolean(value: Any) -> list:
    """[the first boolean] found in a value or inside its lists and mappings, else []."""
    if isinstance(value, bool):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        found = _has_boolean(item)
        if found:
            return found
    return []


def _expand_user(value: Optional[str]) -> Optional[str]:
    # `~` is expanded once, here: the path tl uses and the path it records are then the same
    # (a folder literally named `~` was written while the saved recipe named $HOME).
    return None if value is None else os.path.expanduser(value)


# A path the user writes; `~` means their home directory everywhere tl uses it.
UserPath = Annotated[str, AfterValidator(_expand_user)]


def _own_directory(value: str, what: str) -> str:
    # '' and '.' would make the working directory (often the recipe's own folder) tl's.
    if value.strip() in ("", ".", "./") or Path(value) == Path("."):
        raise ValueError(f"must name a directory of its own for {what}, not '' or '.'")
    return value


# What `device:` (and `--device`) may say; whether that device is here is checked where it is used.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"

# Seeds feed numpy's RandomState and torch generators: both take 32-bit-safe values.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class WeightsSpec(Strict):
    """Where the pretrained weights come from.

    Written as a string (`embedded`, `none`, or a torchvision weight enum such as
    `ResNet18_Weights.IMAGENET1K_V1` / `DEFAULT`) or as `{file: PATH, sha256: HEX}`.
    """

    name: Optional[str] = None
    file: Optional[UserPath] = None
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
    """A zoo model with its weights, or a saved tl run (`checkpoint: RUN_DIR`)
    whose trained model, frozen state included, is the starting point."""

    zoo: Optional[Literal["timm", "torchvision", "tl"]] = None
    model: Optional[str] = Field(default=None, min_length=1)
    weights: Optional[WeightsSpec] = None
    checkpoint: Optional[UserPath] = Field(default=None, min_length=1)
    # Only the spatial size can be overridden (smoke runs on small images); mean,
    # std and interpolation always come from the model's own config.
    input_size: Optional[int] = Field(default=None, ge=8, le=1024)

    @model_validator(mode="after")
    def _one_source(self) -> "BaseSpec":
        if self.checkpoint is not None:
            given = [k for k in ("zoo", "model", "weights", "input_size") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"checkpoint: RUN_DIR brings its own model; drop {', '.join(given)}")
            return self
        return self  # missing zoo/model/weights are reported per key in _check_semantics

    def describe(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint:{self.checkpoint}"
        return f"{self.zoo}:{self.model}"


class InputSpec(Strict):
    """DL4J's input preprocessors: the model takes images with this many channels
    at this size; grey is repeated to RGB, and the image resized to the model's
    input size and normalised inside the model."""

    channels: Literal[1, 3] = 3
    size: int = Field(ge=4, le=1024)


class SplitSpec(Strict):
    """A seeded, stratified split, used when the data is not pre-split on disk."""

    val: float = Field(default=0.1, ge=0.0, lt=1.0)
    test: float = Field(default=0.2, gt=0.0, lt=1.0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _room_to_train(self) -> "SplitSpec":
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves too little to train on")
        return self


class DataSpec(Strict):
    dataset: Optional[Literal["digits", "flowers"]] = None
    imagefolder: Optional[UserPath] = Field(default=None, min_length=1)
    # Where `dataset: flowers` downloads from (a mirror; tests use a local server), and the
    # archive's sha256 there; without url, the official archive and its pinned sha256.
    url: Optional[str] = None
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    split: SplitSpec = SplitSpec()
    # Keep only these classes (by name), in this order: e.g. digits 0-4.
    classes: Optional[list[str]] = None
    # Stratified subsample of this many images before splitting, for smoke runs.
    limit: Optional[int] = Field(default=None, ge=10)
    # The frozen forward's batch (featurize, evaluate); training batches are fine_tune.batch_size.
    batch_size: int = Field(default=64, ge=1, le=1_000_000)
    # Threads that decode and resize ahead of the forward; auto: from the cores this process may use.
    num_workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = "auto"
    # A file that cannot be decoded: stop with its name (error), or leave it out and list it in the run (skip).
    on_bad_image: Literal["error", "skip"] = "error"

    @field_validator("classes", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value]
        return value

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is not None:
            seen = [c for i, c in enumerate(value) if c in value[:i]]
            if seen:
                raise ValueError(f"class '{seen[0]}' is listed twice: each class gets one output")
            if len(value) < 2:
                raise ValueError("a classifier needs 2 or more classes")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if (self.dataset is None) == (self.imagefolder is None):
            raise ValueError("give exactly one of 'dataset: digits|flowers' or 'imagefolder: PATH'")
        if self.url and self.dataset != "flowers":
            raise ValueError("'url' only applies to 'dataset: flowers'")
        if self.sha256 and not self.url:
            raise ValueError("'sha256' goes with 'url' (the official archive's sha256 is pinned)")
        if self.url and not self.sha256:
            raise ValueError("a mirror 'url' needs the archive's 'sha256': nothing unpinned is trained on")
        if self.url and not re.match(r"https://|http://(127\.0\.0\.1|localhost|\[::1\])[:/]", self.url):
            raise ValueError("'url' must be https (plain http only from a loopback address)")
        return self


class FreezeSpec(Strict):
    """What is frozen.

    `until`: DL4J's setFeatureExtractor, the named node(s) and everything
    upstream. `all_but_last: N`: everything upstream of the last N weight
    layers (the Keras idiom). `trainable`: layers that train even though they
    lie in the frozen part; the cache then stops above the first of them.
    """

    until: Optional[Union[str, list[str]]] = None
    all_but_last: Optional[int] = Field(default=None, ge=0)
    trainable: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _none(cls, value: Any) -> Any:
        # `freeze: none` says in the recipe what an absent freeze means: the whole network trains.
        if value == "none":
            return {}
        return value

    @model_validator(mode="after")
    def _one_boundary(self) -> "FreezeSpec":
        if self.until is not None and self.all_but_last is not None:
            raise ValueError("give either until or all_but_last, not both")
        return self

    @property
    def nodes(self) -> list[str]:
        if self.until is None:
            return []
        return [self.until] if isinstance(self.until, str) else list(self.until)

    @property
    def loc(self) -> tuple:
        """Where in the freeze section a boundary problem points."""
        return ("all_but_last",) if self.all_but_last is not None else ("until",)


InitName = Literal["xavier", "kaiming", "normal"]
Activation = Literal["relu", "gelu", "silu", "tanh", "sigmoid", "softmax", "leaky_relu", "elu", "identity"]


class NOutReplace(Strict):
    """DL4J's nOutReplace: new width for a layer; the next weight layer follows."""

    layer: str = Field(min_length=1)
    n_out: int = Field(ge=1)
    init: InitName = "xavier"
    init_next: InitName = "xavier"


class RemoveSpec(Strict):
    """DL4J's removeVertexKeepConnections (true) / removeVertexAndConnections (false).

    keep_connections: true wires the layer's input straight to its consumers;
    false removes the layer and everything downstream that depended on it.
    """

    layer: str = Field(min_length=1)
    keep_connections: bool = False


class AddSpec(Strict):
    """DL4J's addLayer / addVertex: a new node fed by existing ones."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: Literal["linear", "conv1x1", "batchnorm", "dropout", "activation", "pooling", "flatten", "concat", "add"]
    inputs: list[str] = Field(min_length=1)
    # linear / conv1x1: output width; for linear it defaults to the number of classes.
    n_out: Optional[int] = Field(default=None, ge=1)
    bias: bool = True
    init: InitName = "xavier"
    # linear / conv1x1: an activation applied right after, as a node named NAME_act.
    activation: Optional[Activation] = None
    fn: Optional[Activation] = None  # type: activation
    p: Optional[float] = Field(default=None, ge=0, lt=1)  # type: dropout
    pool: Optional[Literal["avg", "max", "adaptive_avg", "adaptive_max"]] = None  # type: pooling
    kernel: Optional[int] = Field(default=None, ge=1, le=4096)
    stride: Optional[int] = Field(default=None, ge=1, le=4096)
    output_size: int = Field(default=1, ge=1, le=4096)  # adaptive pooling
    lr: Optional[float] = Field(default=None, gt=0, le=10)  # this layer's own learning rate

    @model_validator(mode="after")
    def _fields_for_type(self) -> "AddSpec":
        t = self.type
        if t in ("concat", "add") and len(self.inputs) < 2:
            raise ValueError(f"type {t} merges two or more inputs")
        if t not in ("concat", "add") and len(self.inputs) != 1:
            raise ValueError(f"type {t} takes one input, got {len(self.inputs)}")
        if t == "conv1x1" and self.n_out is None:
            raise ValueError("type conv1x1 needs n_out")
        if t == "activation" and self.fn is None:
            raise ValueError("type activation needs fn (relu, gelu, softmax, ...)")
        if t == "pooling" and self.pool is None:
            raise ValueError("type pooling needs pool: avg, max, adaptive_avg or adaptive_max")
        if t == "pooling" and self.pool in ("avg", "max") and self.kernel is None:
            raise ValueError(f"pool: {self.pool} needs kernel")
        if t == "dropout" and self.p is None:
            raise ValueError("type dropout needs p")
        if self.activation is not None and t not in ("linear", "conv1x1"):
            raise ValueError("activation applies to linear and conv1x1; add an activation node instead")
        return self


class Operation(Strict):
    """One graph edit. Edits apply in the order written, before freezing."""

    n_out_replace: Optional[NOutReplace] = None
    remove: Optional[RemoveSpec] = None
    remove_output_layers: Optional[int] = Field(default=None, ge=1)
    add: Optional[AddSpec] = None
    outputs: Optional[list[str]] = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "Operation":
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "each operation is one of n_out_replace, remove, remove_output_layers, add, outputs"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class HeadSpec(Strict):
    """The classifier that is replaced by a new layer sized to the data's classes.

    `auto` is the model's last Linear. It is kept, not replaced, when the recipe
    added it itself with the right width, or when a checkpoint base was trained
    on the same classes (continuing a run). `none` never replaces anything.
    """

    layer: str = "auto"
    init: InitName = "xavier"


class EarlyStopping(Strict):
    monitor: Literal["val_acc", "val_loss"] = "val_acc"
    patience: int = Field(default=5, ge=1, le=100_000)
    min_delta: float = Field(default=0.0, ge=0, le=1e6)


class FineTuneSpec(Strict):
    # auto: a linear head on cached features held in memory is fitted like a linear
    # probe (standardised inputs, full-batch L-BFGS, L2 chosen on val); anything else
    # trains with adam. lbfgs asks for the probe fit outright.
    optimizer: Literal["auto", "sgd", "adam", "adamw", "rmsprop", "lbfgs"] = "auto"
    # Upper bounds catch typos (1e38 overflows inside the optimizer); no real recipe comes near them.
    lr: float = Field(default=1e-3, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0, le=10)
    # Norm weights and biases usually take no weight decay (timm, fastai do the same).
    decay_norm_and_bias: bool = False
    # The learning-rate schedule, stepped every batch; warmup ramps linearly from 0.
    schedule: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: float = Field(default=0.0, ge=0)
    step_epochs: int = Field(default=10, ge=1)  # schedule: step — multiply by step_gamma every step_epochs
    step_gamma: float = Field(default=0.1, gt=0, le=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: Optional[float] = Field(default=None, gt=0, le=1e6)  # max global grad norm
    epochs: int = Field(default=10, ge=1, le=100_000)
    batch_size: int = Field(default=64, ge=1, le=1_000_000)
    seed: Seed = 0
    # Per-layer learning rates by module name (a module covers everything inside it).
    layer_lr: dict[str, float] = {}
    # Discriminative lr: each block further from the output trains at lr * layer_decay^depth.
    layer_decay: Optional[float] = Field(default=None, gt=0, le=1)
    # false keeps trainable BatchNorm layers on their running statistics (their
    # scale and shift still train), as Keras advises when unfreezing a pretrained
    # model: batch statistics of a new data set shift the features the head learnt.
    train_bn: bool = True
    # Sets p of every trainable Dropout layer.
    dropout: Optional[float] = Field(default=None, ge=0, lt=1)
    # Stop when the monitored validation metric stops improving; keep the best epoch's model.
    early_stopping: Optional[EarlyStopping] = None

    @field_validator("layer_lr")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not 0 < v <= 10]
        if bad:
            raise ValueError(f"learning rates must be in (0, 10] ({', '.join(bad)})")
        return value

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "FineTuneSpec":
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer: sgd with momentum > 0")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than epochs ({self.epochs})")
        if self.optimizer == "lbfgs" and (self.layer_lr or self.layer_decay is not None):
            raise ValueError("lbfgs fits one parameter group: drop layer_lr and layer_decay, or use adam")
        return self


class CropSpec(Strict):
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)

    @model_validator(mode="after")
    def _ranges(self) -> "CropSpec":
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale [{lo:g}, {hi:g}] must be a range within (0, 1], smaller first")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ratio [{lo:g}, {hi:g}] must be a positive range, smaller first")
        return self


class JitterSpec(Strict):
    brightness: float = Field(default=0.0, ge=0, le=10)
    contrast: float = Field(default=0.0, ge=0, le=10)
    saturation: float = Field(default=0.0, ge=0, le=10)
    hue: float = Field(default=0.0, ge=0, le=0.5)


class AugmentSpec(Strict):
    """Training-time augmentation (torchvision.transforms.v2), on raw images only."""

    random_resized_crop: Optional[CropSpec] = None
    hflip: float = Field(default=0.0, ge=0, le=1)  # probability
    color_jitter: Optional[JitterSpec] = None


# A stage overrides any fine_tune field; the rest come from the recipe's fine_tune.
FineTuneOverride = create_model(
    "FineTuneOverride",
    __base__=Strict,
    # Each field keeps its own constraints (lr > 0, ...), so a bad override is
    # reported at the stage's line like any other schema error.
    **{
        name: (Optional[Annotated[field.annotation, *field.metadata]] if field.metadata else Optional[field.annotation], None)
        for name, field in FineTuneSpec.model_fields.items()
    },
)


class StageSpec(Strict):
    """One stage of training. The model carries over from the stage before."""

    name: Optional[str] = None
    freeze: Optional[FreezeSpec] = None
    epochs: Optional[int] = Field(default=None, ge=1, le=100_000)
    fine_tune: Optional[FineTuneOverride] = None  # type: ignore[valid-type]
    augment: Optional[AugmentSpec] = None
    # auto: the feature cache when the stage has no augmentation and freezes
    # what the first stage freezes; raw images otherwise. cache: featurize at
    # this stage's own boundary. images: always raw images.
    input: Literal["auto", "cache", "images"] = "auto"


@dataclass(frozen=True)
class Stage:
    """A stage with its settings resolved (recipe defaults + stage overrides)."""

    index: int
    name: str
    freeze: FreezeSpec
    fine_tune: FineTuneSpec
    augment: Optional[AugmentSpec]
    input: str  # "cache" or "images"
    loc: tuple  # where problems with this stage point
    freeze_loc: tuple = ("freeze",)  # where its freeze was written (inherited: the stage or top level that wrote it)

    def fine_tune_loc(self, *rest) -> tuple:
        """Where a fine_tune key of this stage points: the stage's own override, else the top level."""
        return (*self.loc, "fine_tune", *rest) if self.loc else ("fine_tune", *rest)


def merged_fine_tune(base: "FineTuneSpec", spec: "StageSpec") -> "FineTuneSpec":
    """The recipe's fine_tune with a stage's overrides on top; raises pydantic's ValidationError."""
    overrides = spec.fine_tune.model_dump(exclude_none=True) if spec.fine_tune is not None else {}
    if spec.epochs is not None:
        overrides["epochs"] = spec.epochs
    return FineTuneSpec.model_validate({**base.model_dump(), **overrides})


class CacheSpec(Strict):
    dir: UserPath = ".tl-cache"
    # float32 keeps cached features bit-comparable with the full model;
    # bfloat16 runs the frozen part under autocast and halves the cache.
    dtype: Literal["float32", "bfloat16"] = "float32"
    shard_size: int = Field(default=1024, ge=1, le=10_000_000)
    # A cache stage whose train and val rows fit in this many MiB (as float32)
    # loads them onto the device once and runs every epoch from memory.
    memory_mib: int = Field(default=2048, ge=0, le=16 * 2**20)

    @field_validator("dir")
    @classmethod
    def _a_directory_of_its_own(cls, value: str) -> str:
        return _own_directory(value, "the cache (e.g. .tl-cache)")


class DistributedSpec(Strict):
    """Only read under torchrun (WORLD_SIZE > 1); a single process ignores it."""

    # Which batch fine_tune.batch_size is: the global batch (split across ranks, so that a run
    # trains the same with any number of processes), or each rank's (global = it x ranks).
    batch: Literal["global", "per_rank"] = "global"
    # Trainable BatchNorm layers compute their statistics over the global batch (CUDA only).
    sync_batchnorm: bool = False
    # How long a rank waits in a collective for the others before giving up.
    timeout_s: int = Field(default=300, ge=10, le=86_400)


class Recipe(Strict):
    base: BaseSpec
    data: DataSpec
    input: Optional[InputSpec] = None
    surgery: list[Operation] = []
    freeze: FreezeSpec = FreezeSpec()
    head: HeadSpec = HeadSpec()
    fine_tune: FineTuneSpec = FineTuneSpec()
    augment: Optional[AugmentSpec] = None
    stages: list[StageSpec] = []
    cache: CacheSpec = CacheSpec()
    distributed: DistributedSpec = DistributedSpec()
    device: str = "auto"
    output_dir: UserPath

    _source: Optional["RecipeSource"] = PrivateAttr(default=None)

    @field_validator("output_dir")
    @classmethod
    def _a_directory_of_its_own(cls, value: str) -> str:
        return _own_directory(value, "the run (e.g. runs/NAME)")

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

    def warnings(self) -> list[str]:
        """What validates but is likely not what the user meant, each at its line."""
        found = []
        first_freeze = self.stages[0].freeze if self.stages else None
        if self.base.checkpoint is None and "freeze" not in self.model_fields_set and first_freeze is None:
            found.append(str(self.problem(("freeze",), "not given: the whole network trains, end to end. "
                                          "Write 'freeze: none' to say so, or 'freeze: {until: NODE}' to train "
                                          "only what follows NODE ('tl inspect' lists the nodes)")))
        return found

    def anchored(self, cwd: Optional[Path] = None) -> "Recipe":
        """The recipe with every path made absolute (against `cwd`, default the working
        directory), as saved into a run: evaluate and resume then work from anywhere."""
        cwd = Path.cwd() if cwd is None else cwd

        def absolute(value: Optional[str]) -> Optional[str]:
            return None if value is None else str((cwd / Path(value).expanduser()).resolve())

        data = self.data.model_copy(update={"imagefolder": absolute(self.data.imagefolder)})
        base = self.base.model_copy(update={"checkpoint": absolute(self.base.checkpoint)})
        if base.weights is not None and base.weights.file is not None:
            base = base.model_copy(update={"weights": base.weights.model_copy(update={"file": absolute(base.weights.file)})})
        cache = self.cache.model_copy(update={"dir": absolute(self.cache.dir)})
        return self.model_copy(update={"data": data, "base": base, "cache": cache, "output_dir": absolute(self.output_dir)})

    def stage_plan(self) -> list[Stage]:
        """The stages with defaults filled in. Without `stages:`, one stage made
        of the recipe's own freeze, fine_tune and augment."""
        if not self.stages:
            source = "images" if self.augment is not None else "cache"
            return [Stage(0, "fit", self.freeze, self.fine_tune, self.augment, source, ())]
        plan: list[Stage] = []
        for i, spec in enumerate(self.stages):
            # Validated in _check_semantics; a recipe that parsed has a valid merge.
            ft = merged_fine_tune(self.fine_tune, spec)
            if spec.freeze is not None:
                freeze, freeze_loc = spec.freeze, ("stages", i, "freeze")
            elif plan:
                freeze, freeze_loc = plan[-1].freeze, plan[-1].freeze_loc
            else:
                freeze, freeze_loc = self.freeze, ("freeze",)
            source = spec.input
            if source == "auto":
                moved = bool(plan) and freeze != plan[0].freeze
                source = "images" if spec.augment is not None or moved else "cache"
            plan.append(Stage(i, spec.name or f"stage{i + 1}", freeze, ft, spec.augment, source, ("stages", i), freeze_loc))
        return plan


class RecipeSource:
    """The recipe file and its YAML node tree, to turn a dotted path into a line."""

    def __init__(self, name: str, root: Optional[yaml.Node], overrides: Optional[dict[tuple, str]] = None):
        self.name = name
        self.root = root
        # Paths set on the command line (KEY=VALUE): their problems name the override, not a line.
        self.overrides = overrides or {}
        self._override_keys = {tuple(str(p) for p in path): key for path, key in self.overrides.items()}

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
        dotted = ".".join(str(p) for p in loc)
        # The most specific override that set this path or a section above it; a dict
        # lookup per prefix, so that thousands of overrides stay linear.
        parts = tuple(str(p) for p in loc)
        for n in range(len(parts), 0, -1):
            key = self._override_keys.get(parts[:n])
            if key is not None:
                return Problem(f"override {key}", None, dotted if len(loc) > n else "", message)
        return Problem(self.name, self.line_of(loc), dotted, message)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, parse and validate a recipe, with `KEY=VALUE` overrides applied; raise
    `TLError`/`RecipeError` for the user."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TLError(f"{path}: recipe file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise TLError(f"{path}: cannot read recipe: {err}") from None
    return parse_recipe(text, name=str(path), overrides=overrides)


# A recipe is a page of YAML. These bounds refuse, quickly and in one line, a file
# that is not one: an alias bomb ("billion laughs") or nesting that would take
# minutes, gigabytes or Python's recursion limit to expand.
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64


def _walk_nodes(root: yaml.Node, name: str) -> list[Problem]:
    """Count nodes as they would expand (aliases included) and check each mapping's keys once.

    Raises at the first bound crossed; returns duplicate keys (at their second copy) and
    strings with NUL bytes as problems, each at its dotted path."""
    problems, count, seen_maps = [], 0, set()
    stack: list[tuple[yaml.Node, int, tuple]] = [(root, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise RecipeError([Problem(name, None, "", f"the recipe expands to more than {MAX_NODES:,} YAML nodes "
                                                       "(aliases included); refusing to read it")])
        if depth > MAX_DEPTH:
            raise RecipeError([Problem(name, node.start_mark.line + 1, "", f"YAML nested deeper than {MAX_DEPTH} levels")])
        if isinstance(node, yaml.ScalarNode):
            if "\x00" in str(node.value):
                problems.append(Problem(name, node.start_mark.line + 1, _dotted(path), "a NUL byte in a value"))
        elif isinstance(node, yaml.MappingNode):
            if id(node) not in seen_maps:  # an alias repeats a mapping: report its keys once
                seen_maps.add(id(node))
                problems.extend(_duplicate_keys(node, name, path))
            for key, value in node.value:
                here = (*path, key.value if isinstance(key, yaml.ScalarNode) else "?")
                stack.extend(((key, depth + 1, here), (value, depth + 1, here)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1, (*path, i)) for i, child in enumerate(node.value))
    return problems


def _dotted(path: tuple) -> str:
    return ".".join(_shown(str(p), 40) for p in path)


def _duplicate_keys(node: yaml.MappingNode, name: str, path: tuple) -> list[Problem]:
    first: dict[str, int] = {}
    problems = []
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        line = key.start_mark.line + 1
        if key.value in first:
            problems.append(Problem(name, line, _dotted((*path, key.value)), f"duplicate key (first given at line "
                                                                             f"{first[key.value]}); YAML would silently keep this one"))
        else:
            first[key.value] = line
    return problems


def _read_yaml(text: str, name: str) -> tuple[Optional[yaml.Node], Any]:
    """The node tree and the data of one YAML document, within the recipe's bounds (size,
    nodes after aliases, depth, NUL bytes, duplicate keys): a recipe file and every
    override value go through here, so no input can take minutes or gigabytes to read."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError([Problem(name, None, "", f"over {MAX_RECIPE_BYTES // 1024} KiB; refusing to read it")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        problems = _walk_nodes(root, name) if root is not None else []
        if problems:
            raise RecipeError(problems)
        return root, yaml.safe_load(text)
    except RecursionError:
        raise RecipeError([Problem(name, None, "", f"YAML nested deeper than {MAX_DEPTH} levels")]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError([Problem(name, line, "", f"YAML syntax error: {err.problem or err}")]) from None
    except yaml.YAMLError as err:  # e.g. a reader error: a control character in the file
        position = getattr(err, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else None
        raise RecipeError([Problem(name, line, "", f"YAML error: {str(err).splitlines()[0]}")]) from None


def _bounded_yaml(value: str, name: str) -> Any:
    """An override's VALUE, parsed as YAML within the same bounds as a recipe file; no line numbers."""
    if not value.strip():
        return None
    try:
        return _read_yaml(value, name)[1]
    except RecipeError as err:
        raise RecipeError([Problem(p.file, None, p.path, p.message.replace("YAML syntax error", "VALUE is not YAML")
                                   .replace("YAML error", "VALUE is not YAML")) for p in err.problems]) from None


def _shown(text: str, limit: int = 80) -> str:
    """A user's text in a message: shortened, and with undecodable bytes made visible."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_recipe(text: str, name: str = "recipe.yaml", overrides: Sequence[str] = ()) -> Recipe:
    root, data = _read_yaml(text, name)
    if not isinstance(data, dict):
        raise RecipeError([Problem(name, 1, "", "a recipe is a YAML mapping with base, data, output_dir, ...")])
    source = RecipeSource(name, root, apply_overrides(data, overrides))
    base = data.get("base")
    # zoo, model and weights are required unless base is a checkpoint; pydantic
    # can't say so per key, so check the raw mapping (alongside its errors).
    missing = [
        source.problem(("base", key), "required key is missing (or give checkpoint: RUN_DIR)" if key not in base
                       else "must not be null (or give checkpoint: RUN_DIR)")
        for key in ("zoo", "model", "weights")
        if isinstance(base, dict) and base.get("checkpoint") is None and base.get(key) is None
    ]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _problems(err, source) + missing
        problems.sort(key=_reading_order)
        raise RecipeError(problems) from None
    if missing:
        raise RecipeError(missing)
    recipe._source = source
    problems = _check_semantics(recipe)
    if problems:
        raise RecipeError(problems)
    return recipe


def _check_semantics(recipe: Recipe) -> list[Problem]:
    """Checks that span sections, which the per-section schema cannot see."""
    problems = []
    cache_reason = "the cache holds un-augmented activations; train this stage on images (input: images)"
    if recipe.stages and recipe.augment is not None:
        problems.append(recipe.problem(("augment",), "with stages, declare augment inside the stage that trains on images"))
    for i, spec in enumerate(recipe.stages):
        if spec.augment is not None and spec.input == "cache":
            problems.append(recipe.problem(("stages", i, "augment"), f"augmentation with input: cache: {cache_reason}"))
        try:
            merged_fine_tune(recipe.fine_tune, spec)
        except ValidationError as err:
            for e in err.errors():
                problems.append(recipe.problem(("stages", i, "fine_tune", *e["loc"]), str(e.get("ctx", {}).get("error", e["msg"]))))
    return problems


# pydantic names the member of a Union that failed inside the location ("constrained-int",
# "literal['auto']", "function-after[...]", "list[str]"): not a key the user wrote.
_UNION_TAG = re.compile(r"[\[\]()\-]|^(int|float|str|bool|list|dict|tuple|none|json-or-python)$")


def _problems(err: ValidationError, source: RecipeSource) -> list[Problem]:
    merged: dict[tuple, list[str]] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.search(p)))
        merged.setdefault(loc, [])
        message = _message(e, loc)
        if message not in merged[loc]:
            merged[loc].append(message)
    # A value no member of a Union takes fails once per member: one line, its reasons joined.
    problems = [source.problem(loc, "; or ".join(messages)) for loc, messages in merged.items()]
    problems.sort(key=_reading_order)
    return problems


def _message(e: dict, loc: tuple) -> str:
    """One pydantic error as a sentence for the user (`loc`: where, union tags removed)."""
    kind = e["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        fields = _field_names(loc[:-1])
        message = f"unknown key '{key}'{did_you_mean(key, fields)}"
        return message if did_you_mean(key, fields) else message + f" (expected one of: {', '.join(fields)})"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        choices = _literal_choices(loc)
        return f"{e['input']!r} is not one of {', '.join(choices)}{did_you_mean(str(e['input']), choices)}"
    if kind == "value_error":
        return str(e["ctx"].get("error", e["msg"]))
    return e["msg"]


def _reading_order(problem: Problem) -> tuple:
    """The file's problems by line, then the command line's overrides."""
    return (problem.line is None, problem.line or 0, problem.path)


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


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict[tuple, str]:
    """Set `a.b.c=VALUE` overrides (torchtune/Hydra style) into the parsed recipe, in order.

    A VALUE parses as YAML (`0.01`, `true`, `[a, b]`, `null`); a number in the key indexes
    a list (`stages.1.fine_tune.lr=1e-4`). Returns each path set, with the key as written,
    so that a problem there names the override. Malformed overrides are all reported at once."""
    problems, paths = [], {}
    total = sum(len(item.encode("utf-8", "surrogateescape")) for item in overrides)
    if total > MAX_RECIPE_BYTES:
        raise RecipeError([Problem("overrides", None, "", f"the overrides add up to over {MAX_RECIPE_BYTES // 1024} KiB; "
                                                          "refusing to read them")])
    for item in overrides:
        key, eq, value = item.partition("=")
        parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
        if not eq or not all(str(p) for p in parts):
            problems.append(Problem(f"override {_shown(item)}", None, "",
                                    "expected KEY=VALUE with a dotted KEY, e.g. fine_tune.lr=0.01"))
            continue
        try:
            parsed = _bounded_yaml(value, f"override {key}")
        except RecipeError as err:
            problems.extend(err.problems)
            continue
        error = _set_path(data, parts, parsed)
        if error:
            problems.append(Problem(f"override {key}", None, "", error))
        paths[parts] = key.strip()
    if problems:
        raise RecipeError(problems)
    return paths


def _set_path(data: Any, parts: tuple, value: Any) -> Optional[str]:
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(map(str, parts[:i])) or "the recipe"
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                return f"{where} is a list of {len(node)}; index it with 0..{len(node) - 1}"
        elif not isinstance(node, dict):
            return f"{where} is {node!r}, not a section with keys"
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                if isinstance(parts[i + 1], int):
                    return f"{'.'.join(map(str, parts[: i + 1]))} is not in the recipe: there is no item {parts[i + 1]} to set"
                node[part] = {}
            node = node[part]
    return None
