"""The recipe's training sections: fine_tune, early stopping, augment, stages, cache and distributed. Imports no torch."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, create_model, field_validator, model_validator

from tlcli.config.fields import Seed, Strict, UserPath, own_directory
from tlcli.config.sections import FreezeSpec


class EarlyStoppingSpec(Strict):
    monitor: Literal["val_acc", "val_loss"] = Field(default="val_acc", description="The validation metric watched.")
    patience: int = Field(default=5, ge=1, le=100_000, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, le=1e6, description="The least change that counts as an improvement.")


class FineTuneSpec(Strict):
    # auto: a linear head on cached features held in memory is fitted like a linear
    # probe (standardised inputs, full-batch L-BFGS, L2 chosen on val); anything else
    # trains with adam. lbfgs asks for the probe fit outright.
    optimizer: Literal["auto", "sgd", "adam", "adamw", "rmsprop", "lbfgs"] = "auto"
    # Upper bounds catch typos (1e38 overflows inside the optimizer); no real recipe comes near them.
    lr: float = Field(default=1e-3, gt=0, le=10,
                      description="The learning rate: the base of per-layer rates, layer decay and the schedule.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd and rmsprop: momentum.")
    nesterov: bool = Field(default=False, description="sgd: Nesterov momentum.")
    weight_decay: float = Field(default=0.0, ge=0, le=10,
                                description="Weight decay (never on frozen parameters); for the probe fit, its L2 (0: chosen on val).")
    # Norm weights and biases usually take no weight decay (timm, fastai do the same).
    decay_norm_and_bias: bool = False
    # The learning-rate schedule, stepped every batch; warmup ramps linearly from 0.
    schedule: Literal["constant", "step", "cosine", "onecycle"] = "constant"
    warmup_epochs: float = Field(default=0.0, ge=0, description="Epochs of linear warmup from 0, stepped every batch.")
    step_epochs: int = Field(default=10, ge=1)  # schedule: step — multiply by step_gamma every step_epochs
    step_gamma: float = Field(default=0.1, gt=0, le=1, description="schedule step: the factor at each step.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy.")
    grad_clip: Optional[float] = Field(default=None, gt=0, le=1e6)  # max global grad norm
    epochs: int = Field(default=10, ge=1, le=100_000, description="Epochs to train (a stage's `epochs` overrides it).")
    batch_size: int = Field(default=64, ge=1, le=1_000_000,
                            description="The training batch (under torchrun, the global batch unless distributed.batch: per_rank).")
    seed: Seed = Field(default=0,
                       description="Seeds initialisation, shuffling, dropout and augmentation: same seed, same metrics.jsonl.")
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
    refit: bool = Field(default=True, description=(
        "The probe fit of the last stage: once its epochs are done, fit again on train + val at the same L2 (as "
        "scikit-learn's LogisticRegressionCV does); the val scores logged are those of the fit before, on rows it "
        "never saw."))
    class_weights: Union[Literal["balanced"], dict[str, Annotated[float, Field(gt=0, le=1e6)]], None] = Field(
        default=None, description="Weights of the classes in the training loss: balanced (n / (classes * n_class), "
                                  "from the train split) or {class: weight} (unlisted classes weigh 1).")

    @field_validator("class_weights", mode="before")
    @classmethod
    def _class_names(cls, value):
        # YAML reads `{0: 2.0}` with an int key; class names are strings (the folder's, the table's).
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

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
    scale: tuple[float, float] = Field(default=(0.08, 1.0),
                                       description="The crop's area, as a share of the image [low, high].")
    ratio: tuple[float, float] = Field(default=(0.75, 1.3333333333333333),
                                       description="The crop's aspect ratio [low, high].")

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
    brightness: float = Field(default=0.0, ge=0, le=10, description="Brightness factor range (0: none).")
    contrast: float = Field(default=0.0, ge=0, le=10, description="Contrast factor range (0: none).")
    saturation: float = Field(default=0.0, ge=0, le=10, description="Saturation factor range (0: none).")
    hue: float = Field(default=0.0, ge=0, le=0.5, description="Hue shift range (0: none).")


class AugmentSpec(Strict):
    """Training-time augmentation (torchvision.transforms.v2), on raw images only."""

    random_resized_crop: Optional[CropSpec] = Field(default=None,
                                                    description="A random crop of the image, resized back to the input size.")
    hflip: float = Field(default=0.0, ge=0, le=1)  # probability
    color_jitter: Optional[JitterSpec] = Field(default=None,
                                               description="Random brightness, contrast, saturation and hue.")

    @property
    def changes_nothing(self) -> bool:
        """No step is asked for (hflip 0, no crop, no jitter): the stage trains un-augmented. (A
        jitter of zeros is still a step: it draws from the generator, and a seeded run replays it.)"""
        return self.random_resized_crop is None and self.hflip == 0 and self.color_jitter is None


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

    name: Optional[str] = Field(default=None,
                                description="The stage's name in metrics.jsonl and the curves (default stageN).")
    freeze: Optional[FreezeSpec] = Field(default=None,
                                         description="This stage's freeze; without it, the stage before's.")
    epochs: Optional[int] = Field(default=None, ge=1, le=100_000,
                                  description="This stage's epochs (overrides fine_tune.epochs).")
    fine_tune: Optional[FineTuneOverride] = None  # type: ignore[valid-type]
    augment: Optional[AugmentSpec] = Field(default=None,
                                           description="This stage's augmentation (a stage that augments trains on images).")
    # auto: the feature cache when the stage has no augmentation and freezes
    # what the first stage freezes; raw images otherwise. cache: featurize at
    # this stage's own boundary. images: always raw images.
    input: Literal["auto", "cache", "images"] = "auto"


class CacheSpec(Strict):
    dir: UserPath = Field(default=".tl-cache", description="Where caches (and the image digest index) are kept.")
    # How the features are stored, apart from how they are computed (`precision`):
    # bfloat16 halves the cache and rounds every stored feature (a second, separate loss).
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description=(
        "How cached features are stored: float32, or bfloat16 (half the size, each feature rounded). "
        "How they are computed is `precision`."))
    # Measured (make compile-bench): Lite0 on 2 cores, 5,000 images at 224 px, 0.96x the eager
    # time with the first batch's 40 s of compiling counted in, 1.5x faster after it.
    compile: bool = Field(default=False, description=(
        "Featurize with the frozen part compiled by torch.compile (inductor): compiling takes about a minute "
        "on a CPU and pays from a few thousand images; features agree with eager within 1e-4."))
    shard_size: int = Field(default=1024, ge=1, le=10_000_000,
                            description="Rows per shard file: bounds the memory a shard takes.")
    memory_mib: int = Field(default=2048, ge=0, le=16 * 2**20, description=(
        "A cache stage's train and val rows, or an un-augmented image stage's decoded images, that fit in this "
        "many MiB (as float32) are held on the device and every epoch runs from memory; 0 never holds them."))

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


# The unfreeze-from-here measurement's settings, under the recipe's fine_tune: a short run at a
# fine-tuning rate (the recipe's default lr suits a new head, and undoes pretrained blocks).
SWEEP_UNFREEZE_DEFAULTS = {"optimizer": "adam", "lr": 1e-4, "train_bn": False}


class SweepSpec(Strict):
    """What `tl sweep` measures: which boundaries, and for how long each unfreeze-from-here trains."""

    boundaries: Optional[list[Annotated[str, Field(min_length=1, max_length=512)]]] = Field(
        default=None, min_length=1, max_length=16,
        description="The freeze boundaries to compare; default: the output of each top-level block of the base "
                    "(at most 5, evenly spaced), then the head's input.")
    epochs: int = Field(default=1, ge=1, le=1000,
                        description="Epochs of each unfreeze-from-here measurement (a short, fixed budget).")
    unfreeze: bool = Field(default=True,
                           description="Also train everything above each boundary from the cache (LP-FT); "
                                       "false measures probes only.")
    tie: float = Field(default=0.0, ge=0, le=1,
                       description="Val accuracies within this of the best are a tie, broken toward fewer "
                                   "trainable parameters.")
    fine_tune: Optional[FineTuneOverride] = Field(  # type: ignore[valid-type]
        default=None, description="fine_tune keys for the unfreeze-from-here stage, over the recipe's; "
                                  "unset: optimizer adam, lr 0.0001, train_bn false.")


TRACKERS = ("tensorboard", "mlflow", "csv")


class TrackingSpec(Strict):
    """Experiment trackers a fit logs to, beside metrics.jsonl and curves.png."""

    to: list[Literal["tensorboard", "mlflow", "csv"]] = Field(
        default=[], description="tensorboard (event files in RUN/tensorboard), mlflow (one MLflow run per fit), "
                                "csv (RUN/metrics.csv); several at once.")
    mlflow_uri: Optional[str] = Field(default=None, min_length=1, max_length=4096,
                                      description="The MLflow tracking URI; default MLFLOW_TRACKING_URI, else "
                                                  "sqlite:///mlflow.db in the directory tl runs from (MLflow's own default).")
    experiment: str = Field(default="tl", min_length=1, max_length=256, description="The MLflow experiment's name.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        # `tracking: tensorboard` and `tracking: [tensorboard, csv]` say `to:` alone.
        if isinstance(value, str):
            return {"to": [value]}
        if isinstance(value, list):
            return {"to": value}
        return value

    @field_validator("to")
    @classmethod
    def _once_each(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))
