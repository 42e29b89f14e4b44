"""One stage, set up to train: its view of the network, its batches, its optimizer and schedule.

A stage trains from the cache when the trainable part starts at the cached
frontier; on raw images when its boundary lies below the cache or when it
augments. On images the frozen part still runs without gradients and in eval
mode; only the trainable part builds an autograd graph. Frozen parameters
never reach the optimizer, so neither updates nor weight decay touch them.
Under torchrun an image stage trains its trainable part in
DistributedDataParallel, each rank on its share of every epoch's order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from tlcli.config.schema import DistributedSpec, FineTuneSpec
from tlcli.config.stages import Stage
from tlcli.data.pipeline import ImageLoader, augmentation
from tlcli.engine import distributed
from tlcli.engine.cache import Batches, CacheRows, FeatureCache, class_balanced, fits_in_memory
from tlcli.engine.device import to_channels_last
from tlcli.engine.optim import make_optimizer, make_scheduler
from tlcli.engine.precision import FP32, Precision
from tlcli.engine.probe import Probe, lbfgs_epoch, lbfgs_step_on_parts, probe_head, restandardize, standardize
from tlcli.errors import SpecError
from tlcli.model.network import Network


class StageForward:
    """What a stage's steps run: on images, the frozen part (no gradients) then the trainable
    part; on the cache, the trainable part alone. Modes go through the pinned full model,
    which keeps frozen modules in eval."""

    def __init__(self, view: Network, on_images: bool, device: torch.device, train_bn: bool = True,
                 precision: Precision = FP32):
        self.pinned = view.pinned().to(device)
        self.device = device
        # bf16 autocast for an image stage, frozen and trainable parts alike (the loss, outside, in
        # fp32); a cache stage trains in fp32 on the cached rows.
        self.precision = precision if on_images else FP32
        self.norms = [] if train_bn else [m for m in view.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.trainable = view.trainable()
        self.extractor = view.extractor() if on_images else None
        # Convolutions run fastest in channels_last, on images and on cached feature maps alike
        # (one epoch of Lite0's blocks.4-6 from a digits cache at blocks.3: 15.2 s NCHW, 7.0 s).
        self.channels_last = device.type != "mps"
        if self.channels_last:
            to_channels_last(self.pinned, device)
        self.ddp: Optional[nn.Module] = None
        self.training = False

    def distribute(self, device: torch.device, sync_batchnorm: bool, stage: Stage) -> None:
        """Under torchrun: the trainable part in DistributedDataParallel (gradients averaged over
        ranks). The frozen part is never wrapped: it has no gradients to share."""
        from torch.nn.parallel import DistributedDataParallel

        if sync_batchnorm:
            if device.type != "cuda":
                raise SpecError([(("distributed", "sync_batchnorm"), "SyncBatchNorm runs on CUDA only; "
                                  "set it to false on the CPU")])
            use_sync_batchnorm(self.pinned.net, self.trainable, self.pinned.frozen_modules)
        with distributed.collective(f"starting stage {stage.name} under DistributedDataParallel"):
            self.ddp = DistributedDataParallel(self.trainable, device_ids=[device.index] if device.type == "cuda" else None)

    def train(self, mode: bool) -> None:
        self.training = mode
        self.pinned.train(mode)
        for m in self.norms:
            m.eval()

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        with self.precision.autocast(self.device):
            if self.extractor is not None:
                x = inputs[0]
                if self.channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    inputs = list(self.extractor(x))
            elif self.channels_last:
                inputs = [f.contiguous(memory_format=torch.channels_last) if f.ndim == 4 else f for f in inputs]
            # Training steps go through DDP (every rank runs the same number); evaluation does not,
            # since ranks may hold different numbers of validation batches and DDP's forward is a collective.
            if self.ddp is not None and self.training:
                out = self.ddp(*inputs)
            else:
                out = self.trainable(*inputs)
        return out.float() if self.precision.bf16 else out


def use_sync_batchnorm(net: nn.Module, trainable: nn.Module, frozen_modules: list[str]) -> list[str]:
    """Every trainable BatchNorm becomes a SyncBatchNorm (statistics over the global batch),
    placed in the full model *and* in the trainable part, so that one module object serves both
    and `train()` on the model switches it. (A converted copy in the trainable part alone stayed
    in eval mode: it trained nothing.) Frozen BatchNorm is left as it is. Returns the names."""
    frozen = tuple(frozen_modules)
    names = [name for name, m in trainable.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm) and name not in frozen
             and not name.startswith(tuple(f + "." for f in frozen))]
    for name in names:
        # convert_sync_batchnorm of a lone BN returns a new module that shares its parameters and buffers.
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(trainable.get_submodule(name))
        trainable.set_submodule(name, sync)
        net.set_submodule(name, sync)
    return names


# --------------------------------------------------------------------------- where a stage's batches come from


class CacheBatches:
    """A cache stage's batches: rows of the cache, held on the device when they fit."""

    def __init__(self, cache: FeatureCache, device: torch.device, batch: int, memory_mib: int, balanced: bool = False):
        memory = device if fits_in_memory(cache, memory_mib) else None
        self.train_rows, self.val_rows = CacheRows(cache, "train", memory), CacheRows(cache, "val", memory)
        self.batch, self.balanced = batch, balanced
        self.steps = (math.ceil(cache.count("train") / batch) if balanced
                      else sum(math.ceil(rows / batch) for rows in cache.shard_rows("train")))

    def train(self, generator: torch.Generator) -> Batches:
        if self.balanced:
            return self.train_rows.balanced_batches(self.batch, generator)
        return self.train_rows.batches(self.batch, generator)

    def train_labels(self) -> torch.Tensor:
        return torch.cat(self.train_rows.labels()) if self.train_rows.names else torch.zeros(0, dtype=torch.int64)

    def val(self) -> Batches:
        return self.val_rows.batches(1024, None)


class ImageBatches:
    """An image stage's batches, decoded each epoch (or, without augmentation, once and held);
    under torchrun, this rank's share."""

    def __init__(self, view: Network, splits: dict, stage: Stage, device: torch.device, threads: int, batch: int,
                 val_batch: int, on_bad_image: str, skipped: set[str], balanced: bool = False, memory_mib: int = 0):
        self.view, self.splits, self.device, self.threads, self.balanced = view, splits, device, threads, balanced
        self.augment = augmentation(stage.augment, view.preprocess) if stage.augment is not None else None
        self.batch, self.val_batch, self.on_bad_image, self.skipped = batch, val_batch, on_bad_image, skipped
        dist = distributed.current()
        self.rank, self.world = dist.rank, dist.world
        self.steps = math.ceil(math.ceil(len(splits["train"]) / self.world) / batch)
        # Without augmentation every epoch sees the same pixels: decoded once and held on the
        # device when train and val fit in cache.memory_mib (as float32), the epochs after the
        # first skip decoding (one image-stage epoch in bf16 on 2 cores: 6.60 s decoding each
        # epoch, against 4.90 s for a loop on tensors in memory). In one process, and only when a
        # bad image is an error: then every batch holds exactly the rows the loader would give.
        pp = view.preprocess
        size = (len(splits["train"]) + len(splits.get("val", []))) * len(pp.mean) * pp.size * pp.size * 4
        self.hold = (self.augment is None and self.world == 1 and on_bad_image == "error"
                     and size <= memory_mib * 2**20)
        self._held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def train(self, generator: torch.Generator) -> Batches:
        order = self.epoch_order(generator)
        if self.hold:
            x, y = self._decoded("train")
            # The images are on the device, their labels on the CPU (as the loader gives them).
            return (([x.index_select(0, idx.to(x.device))], y.index_select(0, idx))
                    for idx in torch.tensor(order, dtype=torch.long).split(self.batch))
        return self._noting_skips(ImageLoader(self.splits["train"], self.view.preprocess, self.batch, self.device,
                                              self.threads, self.augment, order, on_bad_image=self.on_bad_image))

    def val(self) -> Batches:
        if self.hold and self.splits.get("val"):
            x, y = self._decoded("val")
            return (([x[i : i + self.val_batch]], y[i : i + self.val_batch]) for i in range(0, len(y), self.val_batch))
        # Validation rows are split across ranks without padding: summed, they are the whole split once.
        pairs = self.splits.get("val", [])[self.rank :: self.world]
        return self._noting_skips(ImageLoader(pairs, self.view.preprocess, self.val_batch, self.device, self.threads,
                                              on_bad_image=self.on_bad_image))

    def _decoded(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's images as the loader gives them, in the split's order, decoded once."""
        if split not in self._held:
            loader = ImageLoader(self.splits[split], self.view.preprocess, self.val_batch, self.device, self.threads,
                                 on_bad_image=self.on_bad_image)
            xs, ys = zip(*loader)
            self._held[split] = (torch.cat(xs), torch.cat(ys))
        return self._held[split]

    def epoch_order(self, generator: torch.Generator) -> list[int]:
        """This rank's train rows for an epoch: each once, shuffled; or, balanced, as many draws
        with replacement with every class equally likely."""
        rows = len(self.splits["train"])
        if self.balanced:
            drawn = torch.multinomial(class_balanced(self.train_labels()), rows, replacement=True, generator=generator)
        else:
            drawn = torch.randperm(rows, generator=generator)
        return rank_share(drawn.tolist(), self.rank, self.world)

    def train_labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.splits["train"]], dtype=torch.int64)

    def _noting_skips(self, loader: ImageLoader) -> Iterator:
        for x, y in loader:
            yield [x], y
        self.skipped.update(loader.skipped)


def rank_batch_size(stage: Stage, spec: DistributedSpec, world: int) -> int:
    """This rank's batch: fine_tune.batch_size split across ranks (distributed.batch: global), or as is."""
    batch = stage.fine_tune.batch_size
    if world == 1 or spec.batch == "per_rank":
        return batch
    if batch % world:
        raise SpecError([(stage.fine_tune_loc("batch_size"), f"the global batch {batch} does not split evenly over "
                          f"{world} ranks; make it a multiple of {world}, or set distributed.batch: per_rank")])
    return batch // world


def rank_share(order: list[int], rank: int, world: int) -> list[int]:
    """DistributedSampler's share: the order padded (from its start) to a multiple of the world,
    then every world-th item from `rank`. Batch k of every rank together is batch k of the
    single-process order at world x the batch size; every rank runs the same number of steps."""
    if world == 1:
        return order
    # DistributedSampler's padding repeats the order cyclically: with fewer items than ranks,
    # more than once (a single item is every rank's one step).
    padding = (-len(order)) % world
    padded = order + (order * math.ceil(padding / max(len(order), 1)))[:padding]
    return padded[rank::world]


# --------------------------------------------------------------------------- the stage, set up


@dataclass
class StageSetup:
    """One stage, set up: its view of the network, its batches, optimizer and schedule."""

    stage: Stage
    ft: FineTuneSpec  # the stage's fine_tune with `optimizer: auto` resolved
    view: Network
    forward: StageForward
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: "CacheBatches | ImageBatches"
    has_val: bool
    cache: Optional[FeatureCache] = None
    probe: Optional[Probe] = None
    sharded: bool = False  # under torchrun, an image stage: each rank trains on its share of the batches
    # fine_tune keys this stage's network gives nothing to act on, with why (told as warnings).
    unused: dict[str, str] = field(default_factory=dict)
    class_weight: Optional[torch.Tensor] = None  # the training loss's per-class weights, on the device

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def probe_step(self, optimizer: torch.optim.LBFGS, l2: float) -> dict:
        """One full-batch L-BFGS step of the probe fit on the in-memory train rows."""
        inputs, labels = self.batches.train_rows.memory
        head = self.view.model.get_submodule(self.probe.head)
        return lbfgs_epoch(self.forward, inputs, labels, optimizer, l2, [head.weight], self.class_weight)

    def refit_probe(self, steps: int) -> int:
        """The probe fitted again on train + val together, at its L2, from where its fit ended and
        for as many full-batch steps; returns the rows it saw. Why: the val rows (10% of the data
        by default) chose the L2; once chosen, leaving them out only loses data. On digits as PNGs
        that cost tl 0.9 pt of test accuracy against scikit-learn's probe on the whole train split.
        Both splits stay where they are, standardised anew in place: joining them would hold the
        cached rows twice, past `cache.memory_mib`."""
        (train, *_), train_labels = self.batches.train_rows.memory
        (val, *_), val_labels = self.batches.val_rows.memory
        head = self.view.model.get_submodule(self.probe.head)
        restandardize(self.probe, head, [train, val])
        optimizer = make_optimizer(self.ft, self.params)
        parts = [([train], train_labels), ([val], val_labels)]
        for _ in range(steps):
            lbfgs_step_on_parts(self.forward, parts, optimizer, self.probe.l2, [head.weight], self.class_weight)
        return len(train_labels) + len(val_labels)


def set_up(view: Network, stage: Stage, device: torch.device, batches, cache: Optional[FeatureCache],
           dist_spec: DistributedSpec, has_val: bool, class_names: list[str], precision: Precision) -> StageSetup:
    """The stage's forward, parameters, optimizer (auto resolved) and schedule over `batches`."""
    ft = stage.fine_tune
    on_images = stage.input == "images"
    forward = StageForward(view, on_images, device, ft.train_bn, precision)
    unused = {}
    if not apply_dropout(view.model, forward.pinned.frozen_modules, ft.dropout) and ft.dropout is not None:
        unused["dropout"] = "this stage trains no Dropout layer"
    if not ft.train_bn and not any(p.requires_grad for m in forward.norms for p in m.parameters()):
        unused["train_bn"] = "this stage trains no BatchNorm layer"
    params = [(n, p) for n, p in view.model.named_parameters() if p.requires_grad]
    if not params:
        raise SpecError([(stage.freeze_loc, "everything is frozen: there is nothing left to train")])
    sharded = on_images and distributed.current().enabled
    if sharded:
        forward.distribute(device, dist_spec.sync_batchnorm, stage)
    probe = None if on_images else _probe_for(stage, forward.trainable, cache, batches)
    ft = ft.model_copy(update={"optimizer": "lbfgs" if probe else resolve_optimizer(stage, None)})
    optimizer = make_optimizer(ft, params, {**view.layer_lr, **ft.layer_lr})
    scheduler = make_scheduler(ft, optimizer, 1 if probe else max(batches.steps, 1))
    weights = stage.fine_tune.class_weights
    if probe is not None and getattr(batches, "balanced", False) and weights is None:
        # Full-batch L-BFGS sees every row at every step: nothing to sample. Weighing the classes
        # by 1 / count is the same objective, in expectation, as sampling them equally.
        weights = "balanced"
        unused["sampler"] = "the L-BFGS head fit uses every row each step; it weighs the classes instead"
    # The train labels are read (from the cache's shards, when not in memory) only when weights need them.
    weight = loss_weights(weights, class_names, batches.train_labels()) if weights is not None else None
    return StageSetup(stage, ft, view, forward, params, optimizer, scheduler, batches, has_val, cache, probe, sharded,
                      unused, None if weight is None else weight.to(device))


def loss_weights(spec, class_names: list[str], train_labels: torch.Tensor) -> Optional[torch.Tensor]:
    """fine_tune.class_weights as a tensor: balanced is scikit-learn's n / (classes * n_class)
    over the train split (a class with no train row weighs 1); {class: weight} leaves the
    unlisted classes at 1."""
    if spec is None:
        return None
    k = len(class_names)
    if spec == "balanced":
        counts = torch.bincount(train_labels, minlength=k).double()
        weights = torch.where(counts > 0, len(train_labels) / (k * counts.clamp(min=1)), torch.ones_like(counts))
    else:
        weights = torch.tensor([float(spec.get(name, 1.0)) for name in class_names], dtype=torch.float64)
    return weights.float()


def _probe_for(stage: Stage, trainable: torch.fx.GraphModule, cache: FeatureCache, batches: CacheBatches) -> Optional[Probe]:
    """A probe fit when the stage trains a lone Linear head on rows held in memory (and `auto` or
    `lbfgs` asks for it): the rows are standardised in place, and folded back at the end."""
    head = None
    if batches.train_rows.memory is not None and stage.fine_tune.optimizer in ("auto", "lbfgs"):
        head = probe_head(trainable, [f["shape"] for f in cache.manifest["frontier"]])
    if resolve_optimizer(stage, head) != "lbfgs":
        return None
    val = batches.val_rows.memory
    mean, std = standardize(batches.train_rows.memory[0], [val[0] if val else []])
    return Probe(head, mean, std)


def resolve_optimizer(stage: Stage, probe_head_name: Optional[str]) -> str:
    """What `optimizer: auto` means for this stage: the probe fit for a lone head, else adam."""
    ft = stage.fine_tune
    if ft.optimizer == "lbfgs" and probe_head_name is None:
        raise SpecError([(stage.fine_tune_loc("optimizer"), "lbfgs fits a single Linear head on cached features held "
                          "in memory; this stage trains more than that, on images, or its rows exceed cache.memory_mib")])
    if ft.optimizer == "auto":
        return "lbfgs" if probe_head_name and not ft.layer_lr and ft.layer_decay is None else "adam"
    return ft.optimizer


def apply_dropout(model: nn.Module, frozen_modules: list[str], p: Optional[float]) -> int:
    """`fine_tune.dropout`: the p of every trainable Dropout layer (frozen ones are left alone).
    Returns how many layers it set, so that a setting that reaches none can be told."""
    if p is None:
        return 0
    frozen = set(frozen_modules)
    inside_frozen = tuple(f + "." for f in frozen_modules)
    found = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and name not in frozen and not name.startswith(inside_frozen):
            m.p = p
            found += 1
    return found


@contextlib.contextmanager
def one_thread_for_a_small_head(setup: StageSetup, device: torch.device):
    """Sets torch's process-wide thread count to 1 while a small head trains on the cache, and
    back after: its matrix products are too small to split, and on a busy machine threads
    waiting for each other cost 20x (a digits head fit: 83 s with the default threads, 4.1 s with one)."""
    small = setup.cache is not None and setup.trainable_params * setup.ft.batch_size < 50_000_000
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
