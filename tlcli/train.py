"""Fit: train the recipe's stages, on the feature cache or on raw images.

A stage trains from the cache when the trainable part starts at the cached
frontier; it trains on raw images when its boundary lies below the cache or
when it augments. On images, the frozen part still runs without gradients and
in eval mode; only the trainable part builds an autograd graph.

The model carries over from stage to stage. Frozen parameters never reach
the optimizer, so neither updates nor weight decay can touch them.

Reproducibility: every source of randomness in an epoch (shuffle order,
dropout, augmentation, DataLoader workers) is seeded from (seed, stage,
epoch). Resuming at an epoch boundary therefore replays exactly what an
uninterrupted run does, with model, optimizer, scheduler, early-stopping
state and stage restored from the last epoch's resume state.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tlcli import distributed
from tlcli.build import Prepared, prepare
from tlcli.checkpoint import save_checkpoint
from tlcli.data import DataPlan, require_every_class, plan_data, size_hint
from tlcli.errors import RunError, SpecError, out_of_memory
from tlcli.features import FeatureCache, digest_index, featurize, hash_tensors, read_lock, splits_read_by
from tlcli.files import file_lock
from tlcli.optim import make_optimizer, make_scheduler
from tlcli.pipeline import ImageLoader, augmentation, decode_threads, decoder_name
from tlcli.plots import plot_curves
from tlcli.probe import L2_WITHOUT_VAL, Probe, choose_l2, lbfgs_epoch, probe_head, standardize
from tlcli.progress import Reporter
from tlcli.recipe import (CacheSpec, DataSpec, DistributedSpec, EarlyStopping as EarlyStoppingSpec, FineTuneSpec, Recipe,
                          Stage, dump_recipe)
from tlcli.rundir import CURVES, CheckpointMeta, FollowerRun, ResumeState, RunDir, StageSummary
from tlcli.device import make_deterministic, resolve_device

Batches = Iterator[tuple[list[torch.Tensor], torch.Tensor]]


@dataclass
class FitResult:
    run_dir: Path
    epochs: int
    final: dict
    cache_key: Optional[str]
    seconds: float
    stages: list[StageSummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # undecodable files left out (data.on_bad_image: skip)
    best_kept: bool = False  # early stopping kept an earlier epoch's weights; `final` is that epoch's row


class FitHooks:
    """Observers of a fit (tests, integrations). Each hook sees live objects: look, don't change."""

    def on_train_epoch_end(self, stage: Stage, epoch: int, model: "StageModel") -> None:
        """After an epoch's training pass, before validation; the model is still in train mode."""

    def on_stage_end(self, stage: Stage, net: nn.Module) -> None:
        """After a stage, with the model it leaves (the best epoch's, with early stopping)."""


# --------------------------------------------------------------------------- batches


class CacheRows:
    """One split of the cache: read a shard at a time from disk, or held on the device
    when it fits the memory budget. Either way a generator draws the same shard order
    and row order, so both give the same batches, and the same metrics."""

    def __init__(self, cache: FeatureCache, split: str, device: Optional[torch.device] = None):
        self.cache, self.split = cache, split
        self.names, self.rows = cache.shards(split), cache.shard_rows(split)
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.memory: Optional[tuple[list[torch.Tensor], torch.Tensor]] = None
        if device is not None and self.names:
            parts = [cache.read_shard(name) for name in self.names]
            frontier = [torch.cat([p[0][i] for p in parts]).to(device) for i in range(len(parts[0][0]))]
            self.memory = (frontier, torch.cat([p[1] for p in parts]).to(device))

    def batches(self, batch_size: int, generator: Optional[torch.Generator]) -> Batches:
        order = torch.randperm(len(self.names), generator=generator).tolist() if generator else range(len(self.names))
        for i in order:
            if self.memory is not None:
                frontier, labels = self.memory
                base = self.offsets[i]
            else:
                frontier, labels = self.cache.read_shard(self.names[i])
                base = 0
            rows = torch.randperm(self.rows[i], generator=generator) if generator else torch.arange(self.rows[i])
            rows = (rows + base).to(labels.device)
            for start in range(0, len(rows), batch_size):
                idx = rows[start : start + batch_size]
                yield [f[idx] for f in frontier], labels[idx]


def cached_batches(cache: FeatureCache, split: str, batch_size: int, generator: torch.Generator | None) -> Batches:
    """Mini-batches from the cache, one shard in memory at a time (shuffled when a generator is given)."""
    return CacheRows(cache, split).batches(batch_size, generator)


def _fits_in_memory(cache: FeatureCache, budget_mib: int) -> bool:
    row_bytes = sum(4 * math.prod(f["shape"]) for f in cache.manifest["frontier"])
    rows = cache.count("train") + cache.count("val")
    return rows * row_bytes <= budget_mib * 2**20


def image_batches(data) -> Batches:
    for x, y in data:
        yield [x], y


class StageModel:
    """What a stage runs: on images, the frozen part (no gradients) then the
    trainable part; on the cache, the trainable part alone.

    Modes go through the TransferModel, which pins frozen modules to eval.
    """

    def __init__(self, prepared: Prepared, on_images: bool, device: torch.device, train_bn: bool = True):
        self.transfer = prepared.transfer_model().to(device)
        self.norms = [] if train_bn else [m for m in prepared.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.trainable = prepared.trainable()
        self.extractor = prepared.extractor() if on_images else None
        self.channels_last = on_images and device.type != "mps"
        if self.channels_last:
            self.transfer.to(memory_format=torch.channels_last)
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
            use_sync_batchnorm(self.transfer.net, self.trainable, self.transfer.frozen_modules)
        with distributed.collective(f"starting stage {stage.name} under DistributedDataParallel"):
            self.ddp = DistributedDataParallel(self.trainable, device_ids=[device.index] if device.type == "cuda" else None)

    def train(self, mode: bool) -> None:
        self.training = mode
        self.transfer.train(mode)
        for m in self.norms:
            m.eval()

    def __call__(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.extractor is not None:
            x = inputs[0]
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                inputs = list(self.extractor(x))
        # Training steps go through DDP (every rank runs the same number); evaluation does not,
        # since ranks may hold different numbers of validation batches and DDP's forward is a collective.
        if self.ddp is not None and self.training:
            return self.ddp(*inputs)
        return self.trainable(*inputs)


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


def run_epoch(model, batches: Batches, device, optimizer=None, scheduler=None, ft: FineTuneSpec | None = None,
              over_ranks: bool = False) -> dict:
    """One pass: training when an optimizer is given, else evaluation. Mean loss and accuracy
    (`over_ranks`: of every rank's batches together, under torchrun)."""
    training = optimizer is not None
    smoothing = ft.label_smoothing if ft and training else 0.0
    clip = ft.grad_clip if ft and training else None
    clipped = [p for g in optimizer.param_groups for p in g["params"]] if clip else []
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for inputs, labels in batches:
            inputs = [f.to(device, non_blocking=True) for f in inputs]
            labels = labels.to(device, non_blocking=True)
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(clipped, clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            # .item() is a device sync; once per batch is cheap next to the step.
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    if over_ranks:
        total_loss, correct, seen = distributed.sum_over_ranks([total_loss, correct, seen], device)
        correct, seen = int(correct), int(seen)
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "n": seen}


# --------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """Watches a validation metric; remembers the best epoch's weights; says when to stop."""

    def __init__(self, spec: Optional[EarlyStoppingSpec], snapshot: Callable[[], dict]):
        self.spec = spec
        self.snapshot = snapshot
        self.best_value: Optional[float] = None
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.best_state: Optional[dict[str, torch.Tensor]] = None

    def update(self, row: dict, epoch: int) -> None:
        if self.spec is None:
            return
        value, delta = row[self.spec.monitor], self.spec.min_delta
        if self.best_value is None or (value > self.best_value + delta if self.spec.monitor == "val_acc"
                                       else value < self.best_value - delta):
            self.best_value, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = self.snapshot()
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= self.spec.patience

    def restore(self, state: ResumeState, best_state: Optional[dict]) -> None:
        self.best_value, self.best_epoch, self.bad_epochs = state.best_value, state.best_epoch, state.bad_epochs
        self.stopped, self.best_state = state.stopped, best_state

    def fields(self) -> dict:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped}


# --------------------------------------------------------------------------- one stage


@dataclass
class FitContext:
    """What every stage of one fit shares."""

    run: RunDir
    prepared: Prepared  # the model; each stage views it under its own split
    plan: DataPlan
    data: DataSpec
    cache: CacheSpec
    device: torch.device
    reporter: Reporter
    hooks: FitHooks
    stages: list[Stage] = field(default_factory=list)
    skipped: set[str] = field(default_factory=set)  # undecodable files left out (data.on_bad_image: skip)
    locks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # released when the fit ends
    # State-dict names some stage trains: resume files hold only these. The rest
    # is rebuilt from the recipe and pinned by `frozen_hash`.
    trained: set[str] = field(default_factory=set)
    frozen_hash: Optional[str] = None
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    def trained_state(self) -> dict[str, torch.Tensor]:
        # clone(): safetensors refuses tensors that share storage (tied weights, views).
        return {k: v.detach().to("cpu").clone().contiguous()
                for k, v in self.prepared.model.state_dict().items() if k in self.trained}


@dataclass
class StageRun:
    """One stage, set up: its view of the model, its data, optimizer and schedule."""

    stage: Stage
    ft: FineTuneSpec  # the stage's fine_tune with `optimizer: auto` resolved
    prepared: Prepared
    model: StageModel
    params: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_batches: Callable[[torch.Generator], Batches]
    val_batches: Optional[Callable[[], Batches]]
    cache: Optional[FeatureCache]
    probe: Optional[Probe] = None
    train_rows: Optional[CacheRows] = None
    sharded: bool = False  # under torchrun, an image stage: each rank trains on its share of the batches

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def probe_step(self, optimizer: torch.optim.LBFGS, l2: float) -> dict:
        """One full-batch L-BFGS step of the probe fit on the in-memory train rows."""
        inputs, labels = self.train_rows.memory
        head = self.prepared.model.get_submodule(self.probe.head)
        return lbfgs_epoch(self.model, inputs, labels, optimizer, l2, [head.weight])


def _setup_stage(ctx: FitContext, stage: Stage) -> StageRun:
    ft = stage.fine_tune
    prepared = ctx.prepared.for_stage(stage)
    on_images = stage.input == "images"
    cache = None if on_images else featurize(prepared, ctx.plan, ctx.device, ctx.cache, ctx.data, ctx.reporter,
                                             splits=splits_read_by(stage, ctx.stages))
    if cache is not None:
        ctx.skipped.update(cache.skipped)
        # Held until the fit ends: `featurize --force` must not swap the cache out from under it.
        ctx.locks.enter_context(file_lock(read_lock(cache.path), shared=True))
    model = StageModel(prepared, on_images, ctx.device, ft.train_bn)
    _apply_dropout(prepared.model, model.transfer.frozen_modules, ft.dropout)
    params = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
    if not params:
        raise SpecError([(stage.freeze_loc, "everything is frozen: there is nothing left to train")])
    sharded = on_images and distributed.current().enabled
    if sharded:
        model.distribute(ctx.device, ctx.distributed.sync_batchnorm, stage)
    if on_images:
        train, val, steps, probe, rows = *_image_inputs(ctx, stage, prepared), None, None
    else:
        train, val, steps, probe, rows = _cache_inputs(ctx, stage, model.trainable, cache)
    ft = ft.model_copy(update={"optimizer": "lbfgs" if probe else _resolve_optimizer(stage, None)})
    optimizer = make_optimizer(ft, params, {**prepared.layer_lr, **ft.layer_lr})
    scheduler = make_scheduler(ft, optimizer, max(steps, 1))
    has_val = bool(ctx.plan.splits.get("val"))
    return StageRun(stage, ft, prepared, model, params, optimizer, scheduler, train, val if has_val else None, cache,
                    probe, rows, sharded)


def _resolve_optimizer(stage: Stage, probe_head_name: Optional[str]) -> str:
    ft = stage.fine_tune
    if ft.optimizer == "lbfgs" and probe_head_name is None:
        raise SpecError([(stage.fine_tune_loc("optimizer"), "lbfgs fits a single Linear head on cached features held "
                          "in memory; this stage trains more than that, on images, or its rows exceed cache.memory_mib")])
    if ft.optimizer == "auto":
        return "lbfgs" if probe_head_name and not ft.layer_lr and ft.layer_decay is None else "adam"
    return ft.optimizer


def _image_inputs(ctx: FitContext, stage: Stage, prepared: Prepared):
    splits, pp, dev = ctx.plan.splits, prepared.preprocess, ctx.device
    threads = decode_threads(ctx.data.num_workers, dev)
    augment = augmentation(stage.augment, pp) if stage.augment is not None else None
    bad = ctx.data.on_bad_image
    dist = distributed.current()
    batch = rank_batch_size(stage, ctx.distributed, dist.world)

    def train(g):
        order = rank_share(torch.randperm(len(splits["train"]), generator=g).tolist(), dist.rank, dist.world)
        return _noting_skips(ctx, ImageLoader(splits["train"], pp, batch, dev, threads, augment, order, on_bad_image=bad))

    # Validation rows are split across ranks without padding: summed, they are the whole split once.
    val_pairs = splits.get("val", [])[dist.rank :: dist.world]
    val = lambda: _noting_skips(ctx, ImageLoader(val_pairs, pp, ctx.data.batch_size, dev, threads, on_bad_image=bad))
    return train, val, math.ceil(math.ceil(len(splits["train"]) / dist.world) / batch)


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


def _noting_skips(ctx: FitContext, loader: ImageLoader) -> Batches:
    yield from image_batches(loader)
    ctx.skipped.update(loader.skipped)


def _cache_inputs(ctx: FitContext, stage: Stage, trainable: torch.fx.GraphModule, cache: FeatureCache):
    """Batches from the cache; rows on the device when they fit; a probe fit when the head allows one."""
    ft = stage.fine_tune
    memory = ctx.device if _fits_in_memory(cache, ctx.cache.memory_mib) else None
    train_rows, val_rows = CacheRows(cache, "train", memory), CacheRows(cache, "val", memory)
    head = None
    if train_rows.memory is not None and ft.optimizer in ("auto", "lbfgs"):
        head = probe_head(trainable, [f["shape"] for f in cache.manifest["frontier"]])
    probe = None
    if _resolve_optimizer(stage, head) == "lbfgs":
        mean, std = standardize(train_rows.memory[0], [val_rows.memory[0] if val_rows.memory else []])
        probe = Probe(head, mean, std)
    steps = 1 if probe else sum(math.ceil(rows / ft.batch_size) for rows in cache.shard_rows("train"))
    train = lambda g: train_rows.batches(ft.batch_size, g)
    val = lambda: val_rows.batches(1024, None)
    return train, val, steps, probe, train_rows


def _apply_dropout(model: nn.Module, frozen_modules: list[str], p: Optional[float]) -> None:
    if p is None:
        return
    frozen = set(frozen_modules)
    inside_frozen = tuple(f + "." for f in frozen_modules)
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and name not in frozen and not name.startswith(inside_frozen):
            m.p = p


@contextlib.contextmanager
def _threads_for(sr: StageRun, device: torch.device):
    """A small head on the cache runs on one CPU thread: its matrix products are too
    small to split, and on a busy machine threads waiting for each other cost 20x
    (a digits head fit: 83 s with the default threads, 4.1 s with one)."""
    small = sr.cache is not None and sr.trainable_params * sr.ft.batch_size < 50_000_000
    if device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


def _one_epoch(ctx: FitContext, sr: StageRun, epoch: int) -> dict:
    """Train one epoch, then validate; the metrics row."""
    ft = sr.ft
    seed = epoch_seed(ft.seed, sr.stage.index, epoch)
    # Dropout and augmentation (in-process); under torchrun each rank draws its own, while the
    # data order (the generator below) is the same on every rank.
    torch.manual_seed(seed + distributed.current().rank)
    lr = max(g["lr"] for g in sr.optimizer.param_groups)
    if sr.probe is not None:
        train = sr.probe_step(sr.optimizer, sr.probe.l2)
        sr.scheduler.step()
    else:
        train = run_epoch(sr.model, sr.train_batches(torch.Generator().manual_seed(seed)), ctx.device,
                          sr.optimizer, sr.scheduler, ft, over_ranks=sr.sharded)
    if sr.stage.input == "images" and ctx.data.on_bad_image == "skip":
        _check_no_class_lost(ctx)
    ctx.hooks.on_train_epoch_end(sr.stage, epoch, sr.model)
    row = {"stage": sr.stage.name, "epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "lr": lr}
    if sr.val_batches is not None:
        val = run_epoch(sr.model, sr.val_batches(), ctx.device, over_ranks=sr.sharded)
        row.update(val_loss=val["loss"], val_acc=val["acc"])
    return row


def _check_no_class_lost(ctx: FitContext) -> None:
    """A class whose every train image was skipped would train a head that never saw it."""
    require_every_class(ctx.plan, set().union(*distributed.gather(sorted(ctx.skipped), "gathering skipped images")))


def _restore_stage(ctx: FitContext, sr: StageRun, es: EarlyStopping, state: Optional[ResumeState]) -> int:
    """Optimizer, schedule and early stopping as they were after the saved epoch; the next epoch."""
    if state is None or state.epoch == 0:
        return 1
    saved = ctx.run.resume_object(state, "optim")
    sr.optimizer.load_state_dict(saved["optimizer"])
    sr.scheduler.load_state_dict(saved["scheduler"])
    es.restore(state, ctx.run.resume_tensors(state, "best"))
    return state.epoch + 1


def _fit_stage(ctx: FitContext, stage: Stage, state: Optional[ResumeState], rows: int,
               summaries: list[StageSummary]) -> tuple[int, dict, StageRun, StageSummary]:
    """Run one stage's epochs; (rows written, last row, the stage, its summary)."""
    sr = _setup_stage(ctx, stage)
    es = EarlyStopping(stage.fine_tune.early_stopping, ctx.trained_state)
    first = _restore_stage(ctx, sr, es, state)
    if sr.probe is not None:
        sr.probe.l2 = _probe_l2(ctx, sr, state)
    last_row: dict = {}
    epochs_run = first - 1
    tag = f"{stage.name} ({stage.input}) " if stage.loc or stage.input == "images" else ""
    with ctx.reporter.task(f"fit {tag}".strip(), total=stage.fine_tune.epochs, unit="epoch") as task, \
            ctx.run.epoch_log() as log, _threads_for(sr, ctx.device):
        task.advance(first - 1)
        for epoch in range(first, stage.fine_tune.epochs + 1):
            if es.stopped:
                break
            started = time.perf_counter()
            last_row = _one_epoch(ctx, sr, epoch)
            log.write(last_row, time.perf_counter() - started)
            rows, epochs_run = rows + 1, epoch
            es.update(last_row, epoch)
            state_now = ResumeState(stage=stage.index, epoch=epoch, rows=rows, summaries=summaries,
                                    frozen_hash=ctx.frozen_hash, l2=sr.probe.l2 if sr.probe else None, **es.fields())
            _save_resume(ctx, state_now, sr, es)
            status = f"loss {last_row['train_loss']:.4f}" + (f"  val_acc {last_row['val_acc']:.4f}" if "val_acc" in last_row else "")
            task.advance(1, status=status + ("  early stop" if es.stopped else ""))
    if es.best_state is not None:
        # Early stopping keeps the best epoch's model, not the last one.
        sr.prepared.model.load_state_dict(es.best_state, strict=False)
    if sr.probe is not None:
        sr.probe.fold(sr.prepared.model)
    ctx.hooks.on_stage_end(stage, sr.prepared.model)
    summary = StageSummary(name=stage.name, input=stage.input, frontier=sr.prepared.split.frontier_names,
                           epochs_run=epochs_run, best_epoch=es.best_epoch or None, trainable_params=sr.trainable_params,
                           optimizer=sr.ft.optimizer, l2=sr.probe.l2 if sr.probe else None)
    return rows, last_row, sr, summary


def _probe_l2(ctx: FitContext, sr: StageRun, state: Optional[ResumeState]) -> float:
    """The probe's L2: the recipe's weight_decay, the one a resumed run chose, or the best on val."""
    if sr.ft.weight_decay > 0:
        return sr.ft.weight_decay
    if state is not None and state.epoch > 0 and state.l2 is not None:
        return state.l2
    if sr.val_batches is None:
        return L2_WITHOUT_VAL
    start = {k: v.detach().clone() for k, v in sr.prepared.model.state_dict().items() if k in ctx.trained}

    def fit_with(l2: float) -> dict:
        sr.prepared.model.load_state_dict(start, strict=False)
        optimizer = make_optimizer(sr.ft, sr.params)
        for _ in range(sr.ft.epochs):
            sr.probe_step(optimizer, l2)
        return run_epoch(sr.model, sr.val_batches(), ctx.device)

    with _threads_for(sr, ctx.device):
        chosen = choose_l2(fit_with)
    sr.prepared.model.load_state_dict(start, strict=False)
    ctx.reporter.info(f"{sr.stage.name}: linear probe fit, L2 {chosen:g} chosen on val")
    return chosen


def _save_resume(ctx: FitContext, state: ResumeState, sr: StageRun, es: EarlyStopping) -> None:
    tensors = {"model": ctx.trained_state()}
    if es.best_state is not None:
        tensors["best"] = es.best_state
    ctx.run.save_resume(state, tensors, {"optim": {"optimizer": sr.optimizer.state_dict(),
                                                   "scheduler": sr.scheduler.state_dict()}})


# --------------------------------------------------------------------------- fit


def _saved_recipe(recipe: Recipe) -> str:
    """The resolved recipe as stored in the run, every path absolute, so that the run
    can be evaluated and resumed from any directory."""
    return dump_recipe(recipe.anchored())


def _check_output_dir(recipe: Recipe) -> None:
    """The run directory must not hold the recipe itself: starting over would write over it."""
    source = Path(recipe.source.name)
    out = Path(recipe.output_dir).expanduser().resolve()
    if source.is_file() and out in (source.resolve().parent, *source.resolve().parents):
        raise SpecError([(("output_dir",), f"{recipe.output_dir} holds this recipe file; fit would write over it: "
                                           "choose a directory of its own (e.g. runs/NAME)")])


def _check_plan(stages: list[Stage], plan: DataPlan) -> None:
    """Cross-checks between the stages and the data, before anything is written."""
    issues = [(s.fine_tune_loc("early_stopping"), "early stopping watches the validation split; set data.split.val > 0")
              for s in stages if s.fine_tune.early_stopping is not None and not plan.splits.get("val")]
    if issues:
        raise SpecError(issues)


def fit(recipe: Recipe, reporter: Reporter = Reporter(), force: bool = False, resume: bool = False,
        hooks: FitHooks = FitHooks()) -> FitResult:
    started = time.perf_counter()
    run = RunDir(recipe.output_dir)
    recipe_text = _saved_recipe(recipe)
    with recipe.located():
        _check_output_dir(recipe)
    # Every check is read-only and comes first: a bad recipe or data set creates nothing.
    stages = recipe.stage_plan()
    stage_epochs = [(s.name, s.fine_tune.epochs) for s in stages]
    run.check_for_fit(recipe_text, force, resume, stage_epochs)
    with recipe.located():
        device = resolve_device(recipe.device)
        make_deterministic(device)
        plan = plan_data(recipe.data, digest_index(recipe.cache))
        prepared = prepare(recipe, plan.class_names)
        _check_plan(stages, plan)
    hint = size_hint(plan, prepared.preprocess.size)
    if hint and distributed.current().main:
        reporter.info(f"hint: {hint}")
    dist = distributed.init(device, recipe.distributed.timeout_s)
    if not dist.main:
        run = FollowerRun(run.path)  # under torchrun, rank 0 alone writes the run directory
    ctx = FitContext(run, prepared, plan, recipe.data, recipe.cache, device, reporter, hooks, stages,
                     distributed=recipe.distributed)
    # Every rank has read the directory before rank 0 starts changing it.
    distributed.barrier("checking the run directory")
    with run.exclusive():
        # Again under the lock: another fit may have finished or started in between.
        state = run.check_for_fit(recipe_text, force, resume, stage_epochs) if dist.main else None
        state = distributed.broadcast(state, "reading the resume state")
        return _fit_locked(ctx, recipe, recipe_text, state, started)


def _fit_locked(ctx: FitContext, recipe: Recipe, recipe_text: str, state: Optional[ResumeState],
                started: float) -> FitResult:
    run, prepared, plan, stages = ctx.run, ctx.prepared, ctx.plan, ctx.stages
    _pin_frozen(ctx, stages)
    if state is None:
        run.start(recipe_text)
    else:
        _restore_model(ctx, state)
        ctx.reporter.info(f"resuming {run} at stage {state.stage + 1}, after epoch {state.epoch}")
    with recipe.located(), ctx.locks:
        summaries, last_row, cache_key = _fit_stages(ctx, stages, state)
    # Under torchrun each rank decoded its own share of the images: the run lists every rank's skips.
    ctx.skipped = set().union(*distributed.gather(sorted(ctx.skipped), "gathering skipped images"))
    final = prepared.for_stage(stages[-1]).transfer_model().to("cpu")
    save_checkpoint(run, final, CheckpointMeta(
        model=recipe.base.describe(), head_layer=prepared.head_layer, class_names=plan.class_names,
        preprocess=prepared.preprocess.to_dict(), frontier=prepared.splits[stages[-1].index].frontier_names,
        cache_key=cache_key, data_fingerprint=plan.fingerprint(), stages=summaries, decoder=decoder_name(ctx.device),
        skipped_images=sorted(ctx.skipped), frozen_modules=final.frozen_modules, frozen_attrs=final.frozen_attrs,
    ))
    # Under torchrun only rank 0 has the log; the others report their last row.
    rows = run.metrics() if distributed.current().main else []
    if rows:
        plot_curves(rows, run / CURVES)
    epochs = sum(s.epochs_run for s in summaries)
    final, best_kept = _kept_row(rows, summaries[-1], last_row)
    return FitResult(run.path, epochs, final, cache_key, time.perf_counter() - started, summaries, sorted(ctx.skipped),
                     best_kept)


def _kept_row(rows: list[dict], last: StageSummary, last_row: dict) -> tuple[dict, bool]:
    """The metrics of the model that was kept: the best epoch's under early stopping, else the last."""
    if last.best_epoch and last.best_epoch != last.epochs_run:
        for row in rows:
            if row.get("stage") == last.name and row.get("epoch") == last.best_epoch:
                return row, True
    return (last_row or (rows[-1] if rows else {})), False


def _pin_frozen(ctx: FitContext, stages: list[Stage]) -> None:
    """Which tensors some stage trains (resume saves those), and a hash of all the others."""
    model = ctx.prepared.model
    state = model.state_dict()
    for s in stages:
        ctx.trained |= set(state) - set(ctx.prepared.splits[s.index].frozen_state_names(model))
    ctx.frozen_hash = hash_tensors({k: v for k, v in state.items() if k not in ctx.trained})


def _restore_model(ctx: FitContext, state: ResumeState) -> None:
    """The model as it was after the saved epoch (or stage); _fit_stage restores the rest."""
    if state.frozen_hash is not None and state.frozen_hash != ctx.frozen_hash:
        raise RunError(f"{ctx.run}: the base model's frozen weights changed since this run started; "
                       "resume needs the same weights (pass --force to start over)")
    saved = ctx.run.resume_tensors(state, "model")
    unknown = set(saved) - set(ctx.prepared.model.state_dict())
    if unknown:
        raise RunError(f"{ctx.run}: the resume state does not fit the model ({sorted(unknown)[:3]}); pass --force")
    ctx.prepared.model.load_state_dict(saved, strict=False)
    ctx.run.rewind_logs(state.rows)


def _fit_stages(ctx: FitContext, stages: list[Stage], state: Optional[ResumeState]):
    """Every stage from the resumed one on; (summaries, last metrics row, cache key)."""
    rows = state.rows if state else 0
    summaries = list(state.summaries) if state else []
    last_row: dict = {}
    cache_key = None
    for stage in stages[state.stage if state else 0:]:
        here = state if state is not None and state.stage == stage.index else None
        ft = stage.fine_tune
        with out_of_memory(f"training stage '{stage.name}' (batch {ft.batch_size})",
                           "lower fine_tune.batch_size (cache.memory_mib, on the cache), or the n_out of layers "
                           "the surgery adds"):
            rows, row, sr, summary = _fit_stage(ctx, stage, here, rows, summaries)
        last_row = row or last_row
        cache_key = sr.cache.key if sr.cache is not None else cache_key
        summaries.append(summary)
        # The stage is done: a resume from here starts the next stage with this model.
        ctx.run.save_resume(ResumeState(stage=stage.index + 1, epoch=0, rows=rows, summaries=summaries,
                                        frozen_hash=ctx.frozen_hash), {"model": ctx.trained_state()}, {})
    return summaries, last_row, cache_key
