"""The recipe's schema: every section a recipe may have, with its bounds, and the Recipe itself. Imports no torch.

Each section validates its own fields; checks that span sections are in
`config.stages` and `config.reading`. A Recipe remembers where it was read
from (`source`), so that problems found later, below, can be put at a line.
"""

from __future__ import annotations

import contextlib
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, PrivateAttr, create_model, field_validator, model_validator

from tlcli.config.fields import DEVICE_PATTERN, Seed, Strict, UserPath, own_directory
from tlcli.config.source import RecipeSource
from tlcli.errors import Problem, RecipeError, SpecError


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
    fn: Optional[Activation] = None  # for type activation
    p: Optional[float] = Field(default=None, ge=0, lt=1)  # for type dropout
    pool: Optional[Literal["avg", "max", "adaptive_avg", "adaptive_max"]] = None  # for type pooling
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


class EarlyStoppingSpec(Strict):
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
    early_stopping: Optional[EarlyStoppingSpec] = None

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
        name: (Optional[Annotated[(field.annotation, *field.metadata)]] if field.metadata else Optional[field.annotation], None)
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
        return own_directory(value, "the cache (e.g. .tl-cache)")


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
