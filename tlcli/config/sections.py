"""The recipe's model and data sections: base, weights, data, split, input, surgery, freeze, head. Imports no torch.

Each section validates its own fields, with bounds; checks that span sections
are in `config.stages` and `config.reading`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_serializer, model_validator

from tlcli.config.fields import Seed, Strict, UserPath


class WeightsSpec(Strict):
    """Where the pretrained weights come from.

    Written as a string (`embedded`, `none`, or a torchvision weight enum such as
    `ResNet18_Weights.IMAGENET1K_V1` / `DEFAULT`) or as `{file: PATH, sha256: HEX}`.
    """

    name: Optional[str] = Field(default=None,
                                description="embedded, pretrained, none, or a torchvision weight enum (IMAGENET1K_V1, DEFAULT, ResNet18_Weights.IMAGENET1K_V1).")
    file: Optional[UserPath] = Field(default=None,
                                     description="A local weights file (.safetensors, or a torch file read with weights_only).")
    sha256: Optional[str] = Field(default=None, description="The file's sha256, checked before it is loaded.")

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

    zoo: Optional[Literal["timm", "torchvision", "tl"]] = Field(default=None,
                                                                description="Where the model comes from: timm, torchvision, or tl's own small models.")
    model: Optional[str] = Field(default=None, min_length=1,
                                 description="The zoo's model name (`tl models` lists them; timm names may carry a pretrained tag).")
    weights: Optional[WeightsSpec] = Field(default=None,
                                           description="embedded (the packaged Lite0), pretrained (timm, from the hub), a torchvision enum, none, or {file: PATH, sha256: HEX}.")
    checkpoint: Optional[UserPath] = Field(default=None, min_length=1,
                                           description="A finished tl run to start from (its surgery, trained weights and classes); replaces zoo, model and weights.")
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

    channels: Literal[1, 3] = Field(default=3,
                                    description="1 for grey images (repeated to RGB inside the model), 3 for colour.")
    size: int = Field(ge=4, le=1024,
                      description="The size the images arrive at; the model resizes them to its own input size.")


class SplitSpec(Strict):
    """A seeded, stratified split, used when the data is not pre-split on disk."""

    val: float = Field(default=0.1, ge=0.0, lt=1.0, description="The share of images for validation.")
    test: float = Field(default=0.2, gt=0.0, lt=1.0, description="The share of images held out for tl evaluate.")
    seed: Seed = Field(default=0, description="The split's seed.")

    @model_validator(mode="after")
    def _room_to_train(self) -> "SplitSpec":
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves too little to train on")
        return self


class DataSpec(Strict):
    dataset: Optional[Literal["digits", "flowers"]] = Field(default=None,
                                                            description="A bundled data set: digits (scikit-learn's, offline) or flowers (downloaded once).")
    imagefolder: Optional[UserPath] = Field(default=None, min_length=1,
                                            description="A folder with one subfolder of images per class, optionally pre-split into train/ val/ test/.")
    csv: Optional[UserPath] = Field(default=None, min_length=1,
                                    description="A CSV table with a header: one row per image, its path and its label (and its split).")
    jsonl: Optional[UserPath] = Field(default=None, min_length=1,
                                      description="A JSON Lines table: one object per line, with the same columns as csv.")
    path_column: str = Field(default="path", min_length=1, max_length=256,
                             description="The table's column of image paths, relative to root.")
    label_column: str = Field(default="label", min_length=1, max_length=256,
                              description="The table's column of class names.")
    split_column: Optional[str] = Field(default=None, min_length=1, max_length=256,
                                        description="The table's column of splits (train, val, test); without it, data.split carves them.")
    root: Optional[UserPath] = Field(default=None, min_length=1,
                                     description="The folder the table's paths are relative to (default: the table's own folder).")
    # Where `dataset: flowers` downloads from (a mirror; tests use a local server), and the
    # archive's sha256 there; without url, the official archive and its pinned sha256.
    url: Optional[str] = None
    sha256: Optional[str] = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$",
                                  description="The mirror archive's sha256 (required with url).")
    split: SplitSpec = Field(default=SplitSpec(),
                             description="How a folder that is not split on disk is split: seeded and stratified.")
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
    sampler: Literal["shuffle", "balanced"] = Field(
        default="shuffle", description="How an epoch draws the train rows: each once, shuffled; or balanced, as many "
                                       "draws with replacement, each class equally likely.")

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
        sources = [k for k in ("dataset", "imagefolder", "csv", "jsonl") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of 'dataset: digits|flowers', 'imagefolder: PATH', 'csv: PATH' or "
                             f"'jsonl: PATH'{' (this gives ' + ', '.join(sources) + ')' if sources else ''}")
        # Compared with the defaults, not model_fields_set: a saved recipe writes every key out.
        table_keys = [k for k in ("path_column", "label_column", "split_column", "root")
                      if getattr(self, k) != type(self).model_fields[k].default]
        if table_keys and not (self.csv or self.jsonl):
            raise ValueError(f"'{table_keys[0]}' describes a table: it goes with 'csv: PATH' or 'jsonl: PATH'")
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

    until: Optional[Union[str, list[str]]] = Field(default=None,
                                                   description="DL4J's setFeatureExtractor: this node (or these nodes) and everything upstream are frozen.")
    all_but_last: Optional[int] = Field(default=None, ge=0,
                                        description="The Keras idiom: everything upstream of the last N weight layers is frozen.")
    trainable: list[str] = Field(default=[],
                                 description="Layers inside the frozen part that train anyway; the cache then stops above the first of them.")

    @model_validator(mode="before")
    @classmethod
    def _none(cls, value: Any) -> Any:
        # `freeze: none` says in the recipe what an absent freeze means: the whole network trains.
        if value == "none":
            return {}
        if isinstance(value, dict) and "until" in value and value["until"] is None and value.get("all_but_last") is not None:
            # `until: null` beside all_but_last (an override switching boundaries) says "not until".
            value = {k: v for k, v in value.items() if k != "until"}
        if value is None:
            # `freeze:` with nothing after it, like `until:`, would freeze nothing, silently (`{}` says it).
            raise ValueError("names no boundary: write 'freeze: {until: NODE}' ('tl inspect' lists the nodes), or "
                             "'freeze: none' to train the whole network")
        return value

    @field_validator("until")
    @classmethod
    def _names_a_node(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        # `until:` with nothing after it parses as null and would freeze nothing, silently.
        if value is None or value == [] or (isinstance(value, str) and not value.strip()):
            raise ValueError("names no node: give one ('tl inspect' lists them), or write 'freeze: none' "
                             "to train the whole network")
        return value

    @model_validator(mode="after")
    def _one_boundary(self) -> "FreezeSpec":
        if self.until is not None and self.all_but_last is not None:
            raise ValueError("give either until or all_but_last, not both")
        if self.trainable and self.until is None and self.all_but_last is None:
            raise ValueError("trainable names layers that train inside the frozen part, but nothing is frozen: "
                             "add until or all_but_last")
        return self

    @model_serializer(mode="wrap")
    def _as_written(self, handler):
        # The saved recipe reads back as it was meant: `none`, or only the keys that say something
        # (a dumped `until: null` would read back as the empty boundary refused above).
        if self.until is None and self.all_but_last is None and not self.trainable:
            return "none"
        return {k: v for k, v in handler(self).items() if v is not None and v != []}

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

    layer: str = Field(min_length=1, description="The Linear or Conv2d to resize.")
    n_out: int = Field(ge=1, description="Its new width.")
    init: InitName = Field(default="xavier", description="How the resized layer is initialised.")
    init_next: InitName = Field(default="xavier",
                                description="How the next weight layer (whose input width follows) is initialised.")


class RemoveSpec(Strict):
    """DL4J's removeVertexKeepConnections (true) / removeVertexAndConnections (false).

    keep_connections: true wires the layer's input straight to its consumers; = Field(
                                                                                      description="true: wire its input to its consumers; false: remove it and everything downstream that depended on it.")
    false removes the layer and everything downstream that depended on it.
    """

    layer: str = Field(min_length=1, description="The node to remove.")
    keep_connections: bool = Field(default=False,
                                   description="true: wire its input to its consumers; false: remove it and everything downstream that depended on it.")


class AddSpec(Strict):
    """DL4J's addLayer / addVertex: a new node fed by existing ones."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The new node's name (an identifier).")
    type: Literal["linear", "conv1x1", "batchnorm", "dropout", "activation", "pooling", "flatten", "concat", "add"] = Field(
                                                                                                                            description="What the node is.")
    inputs: list[str] = Field(min_length=1, description="The nodes it takes (two or more for concat and add).")
    # linear / conv1x1: output width; for linear it defaults to the number of classes.
    n_out: Optional[int] = Field(default=None, ge=1)
    bias: bool = Field(default=True, description="linear / conv1x1: with a bias.")
    init: InitName = Field(default="xavier", description="linear / conv1x1: how the new weights are initialised.")
    # linear / conv1x1: an activation applied right after, as a node named NAME_act.
    activation: Optional[Activation] = None
    fn: Optional[Activation] = None  # for type activation
    p: Optional[float] = Field(default=None, ge=0, lt=1)  # for type dropout
    pool: Optional[Literal["avg", "max", "adaptive_avg", "adaptive_max"]] = None  # for type pooling
    kernel: Optional[int] = Field(default=None, ge=1, le=4096, description="pooling avg / max: the kernel size.")
    stride: Optional[int] = Field(default=None, ge=1, le=4096,
                                  description="pooling avg / max: the stride (default: the kernel).")
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

    n_out_replace: Optional[NOutReplace] = Field(default=None,
                                                 description="DL4J's nOutReplace: a layer's new width; the next weight layer follows.")
    remove: Optional[RemoveSpec] = Field(default=None,
                                         description="DL4J's removeVertex: take a layer out, keeping or dropping its connections.")
    remove_output_layers: Optional[int] = Field(default=None, ge=1,
                                                description="Pop the last N nodes, like Keras' pop().")
    add: Optional[AddSpec] = Field(default=None,
                                   description="DL4J's addLayer / addVertex: a new node fed by existing ones.")
    outputs: Optional[list[str]] = Field(default=None, min_length=1,
                                         description="DL4J's setOutputs: the node the model outputs (tl trains one output).")

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

    layer: str = Field(default="auto",
                       description="auto: the model's last Linear; a layer name; or none (never replace).")
    init: InitName = Field(default="xavier", description="How the new classifier is initialised.")
