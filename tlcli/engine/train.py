"""Fit: train the recipe's stages, stage by stage, epoch by epoch, step by step; the loop reads top to bottom.

`fit` plans once, checks the run directory, and runs `_train_stages`: for
each stage, set it up, restore it when resuming, then per epoch train (the
steps), validate, log, watch early stopping and save a resume state. What is
not the loop is a named step in `engine.fit_steps` (restore, early stopping,
writing). The model carries over from stage to stage; the checkpoint is
written last, under the last stage's split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tlcli.config.reading import anchored, dump_recipe
from tlcli.config.schema import FineTuneSpec, Recipe
from tlcli.config.stages import Stage, ignored_by_optimizer, ignored_keys
from tlcli.data.pipeline import decode_threads
from tlcli.data.sources import require_every_class
from tlcli.engine import distributed
from tlcli.engine.cache import Batches, read_lock
from tlcli.engine.features import featurize, splits_read_by
from tlcli.engine.fit_steps import (EarlyStopping, FitContext, FitHooks, pin_frozen, restore_model, restore_stage,
                                    save_epoch, save_stage_done, write_checkpoint)
from tlcli.engine.optim import make_optimizer
from tlcli.engine.plan import Plan, make_plan
from tlcli.engine.probe import L2_WITHOUT_VAL, choose_l2
from tlcli.engine.stage import (CacheBatches, ImageBatches, StageSetup, one_thread_for_a_small_head, rank_batch_size,
                                set_up)
from tlcli.errors import SpecError, out_of_memory
from tlcli.files import file_lock
from tlcli.progress import Reporter
from tlcli.report.plots import plot_curves
from tlcli.run.records import StageSummary
from tlcli.run.rundir import CURVES, RunDir
from tlcli.run.tracking import Trackers

__all__ = ["FitHooks", "FitResult", "fit", "fit_plan", "train_epoch", "evaluate_epoch"]


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
    precision: str = "fp32"  # what the frozen part and image stages ran at


def fit(recipe: Recipe, reporter: Reporter = Reporter(), force: bool = False, resume: bool = False,
        hooks: FitHooks = FitHooks()) -> FitResult:
    """`tl fit`: plan once, check the run directory (reading only), then train every stage."""
    started = time.perf_counter()
    return fit_plan(make_plan(recipe), reporter, force, resume, hooks, started)


def fit_plan(plan: Plan, reporter: Reporter = Reporter(), force: bool = False, resume: bool = False,
             hooks: FitHooks = FitHooks(), started: Optional[float] = None) -> FitResult:
    """Fit a planned recipe (a sweep plans many recipes on one data plan)."""
    started = time.perf_counter() if started is None else started
    recipe = plan.recipe
    with recipe.located():
        _check_stages_against_data(plan)
    recipe_text = dump_recipe(anchored(recipe))  # every path absolute: the run works from any directory
    stage_epochs = [(s.name, s.fine_tune.epochs) for s in plan.stages]
    run = RunDir(recipe.output_dir, writer=plan.dist.main)  # under torchrun, rank 0 alone writes the run
    with recipe.located():
        run.check_for_fit(recipe_text, force, resume, stage_epochs, Path(recipe.source.name))
    plan.report_hints(reporter)
    distributed.barrier("checking the run directory")  # every rank has read it before rank 0 changes it
    with run.exclusive():
        # Again under the lock: another fit may have finished or started in between.
        state = run.check_for_fit(recipe_text, force, resume, stage_epochs) if plan.dist.main else None
        state = distributed.broadcast(state, "reading the resume state")
        ctx = FitContext(plan, run, reporter, hooks)
        if plan.dist.main and recipe.precision != "fp32":  # auto or bf16: which, and why, on this machine
            reporter.info(f"precision: {plan.precision.reason}")
        pin_frozen(ctx)
        if state is None:
            run.start(recipe_text)
        else:
            restore_model(ctx, state)
            reporter.info(f"resuming {run} at stage {state.stage + 1}, after epoch {state.epoch}")
        if recipe.tracking.to and plan.dist.main:
            ctx.trackers = Trackers(recipe, run.path, recipe_text, state.rows if state else None)
        with recipe.located(), ctx.locks:
            summaries, last_row, cache_key = _train_stages(ctx, state)
        result = _finish(ctx, summaries, last_row, cache_key, time.perf_counter() - started)
    plan.precision_hint(reporter)  # after the work: what to try next time
    return result


def _check_stages_against_data(plan) -> None:
    """What a stage needs of the data, checked before anything is written."""
    issues = [(s.fine_tune_loc("early_stopping"), "early stopping watches the validation split; set data.split.val > 0")
              for s in plan.stages if s.fine_tune.early_stopping is not None and not plan.data.splits.get("val")]
    if issues:
        raise SpecError(issues)


def _train_stages(ctx: FitContext, state) -> tuple[list[StageSummary], dict, Optional[str]]:
    """The loop: stage -> epoch -> step. Every stage from the resumed one on; (summaries, last
    metrics row, cache key)."""
    rows = state.rows if state else 0
    summaries = list(state.summaries) if state else []
    last_row, cache_key = {}, None
    for stage in ctx.plan.stages[state.stage if state else 0:]:
        ft = stage.fine_tune
        with out_of_memory(f"training stage '{stage.name}' (batch {ft.batch_size})",
                           "lower fine_tune.batch_size (cache.memory_mib, on the cache), or the n_out of layers "
                           "the surgery adds"):
            setup = _set_up_stage(ctx, stage)
            stopper = EarlyStopping(ft.early_stopping, ctx.trained_state)
            first = restore_stage(ctx, setup, stopper, state if state is not None and state.stage == stage.index else None)
            _choose_probe_l2(ctx, setup, state)
            epochs_run = first - 1
            with (ctx.reporter.task(_task_name(stage), total=ft.epochs, unit="epoch") as task,
                  one_thread_for_a_small_head(setup, ctx.plan.device)):
                task.advance(epochs_run)
                for epoch in range(first, ft.epochs + 1):
                    if stopper.stopped:
                        break
                    started = time.perf_counter()
                    last_row = _epoch(ctx, setup, epoch)
                    ctx.run.log_epoch(last_row, time.perf_counter() - started)
                    rows, epochs_run = rows + 1, epoch
                    if ctx.trackers is not None:
                        ctx.trackers.log_epoch(last_row, rows, ctx.run.metrics())
                    stopper.update(last_row, epoch)
                    save_epoch(ctx, setup, stopper, epoch, rows, summaries)
                    task.advance(1, status=_status(last_row, stopper))
        summaries.append(_finish_stage(ctx, setup, stopper, epochs_run))
        cache_key = setup.cache.key if setup.cache is not None else cache_key
        save_stage_done(ctx, stage, rows, summaries)
    return summaries, last_row, cache_key


def _epoch(ctx: FitContext, setup: StageSetup, epoch: int) -> dict:
    """One epoch: the training steps, then validation; its metrics row."""
    seed = epoch_seed(setup.ft.seed, setup.stage.index, epoch)
    # Dropout and augmentation (in-process); under torchrun each rank draws its own, while the
    # data order (the generator below) is the same on every rank.
    torch.manual_seed(seed + ctx.plan.dist.rank)
    lr = max(g["lr"] for g in setup.optimizer.param_groups)
    if setup.probe is not None:
        train = setup.probe_step(setup.optimizer, setup.probe.l2)
        setup.scheduler.step()
    else:
        batches = setup.batches.train(torch.Generator().manual_seed(seed))
        train = train_epoch(setup.forward, batches, ctx.plan.device, setup.optimizer, setup.scheduler, setup.ft,
                            over_ranks=setup.sharded, class_weight=setup.class_weight)
    if setup.stage.input == "images" and ctx.plan.recipe.data.on_bad_image == "skip":
        # A class whose every train image was skipped would train a head that never saw it.
        require_every_class(ctx.plan.data, set().union(*distributed.gather(sorted(ctx.skipped), "gathering skipped images")))
    ctx.hooks.on_train_epoch_end(setup.stage, epoch, setup.forward)
    row = {"stage": setup.stage.name, "epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "lr": lr}
    if setup.has_val:
        val = evaluate_epoch(setup.forward, setup.batches.val(), ctx.plan.device, over_ranks=setup.sharded)
        row.update(val_loss=val["loss"], val_acc=val["acc"])
    return row


def train_epoch(forward, batches: Batches, device, optimizer, scheduler, ft: FineTuneSpec, over_ranks: bool = False,
                class_weight: Optional[torch.Tensor] = None) -> dict:
    """The training steps of one epoch: forward, loss (weighted per class when asked), backward,
    (clip,) step, schedule."""
    clipped = [p for g in optimizer.param_groups for p in g["params"]] if ft.grad_clip else []
    forward.train(True)
    total = _Totals(device)
    for inputs, labels in batches:
        inputs = [f.to(device, non_blocking=True) for f in inputs]
        labels = labels.to(device, non_blocking=True)
        logits = forward(inputs)
        loss = F.cross_entropy(logits, labels, weight=class_weight, label_smoothing=ft.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ft.grad_clip:
            torch.nn.utils.clip_grad_norm_(clipped, ft.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total.add(loss, logits, labels)
    return total.result(over_ranks)


def evaluate_epoch(forward, batches: Batches, device, over_ranks: bool = False) -> dict:
    """Mean loss and accuracy of the model on `batches`, in eval mode, without gradients."""
    forward.train(False)
    total = _Totals(device)
    with torch.no_grad():
        for inputs, labels in batches:
            inputs = [f.to(device, non_blocking=True) for f in inputs]
            labels = labels.to(device, non_blocking=True)
            logits = forward(inputs)
            total.add(F.cross_entropy(logits, labels), logits, labels)
    return total.result(over_ranks)


class _Totals:
    """Loss and accuracy summed on the device and read back once per epoch (a read is a device
    sync). float64: the same sums, bit for bit, as adding each batch's loss.item() in Python."""

    def __init__(self, device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.detach().to(torch.float64) * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)

    def result(self, over_ranks: bool) -> dict:
        loss, correct, seen = self.loss.item(), int(self.correct.item()), self.seen
        if over_ranks:
            loss, correct, seen = distributed.sum_over_ranks([loss, correct, seen], self.device)
            correct, seen = int(correct), int(seen)
        return {"loss": loss / max(seen, 1), "acc": correct / max(seen, 1), "n": seen}


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


def _set_up_stage(ctx: FitContext, stage: Stage) -> StageSetup:
    """The stage's view of the network and its batches: from the cache (built if missing) or from images."""
    plan = ctx.plan
    view = plan.network.for_stage(stage)
    has_val = bool(plan.data.splits.get("val"))
    spec = plan.recipe.data
    if stage.input == "images":
        batch = rank_batch_size(stage, plan.recipe.distributed, plan.dist.world)
        batches = ImageBatches(view, plan.data.splits, stage, plan.device, decode_threads(spec.num_workers, plan.device),
                               batch, spec.batch_size, spec.on_bad_image, ctx.skipped, balanced=spec.sampler == "balanced",
                               memory_mib=plan.recipe.cache.memory_mib)
        return _told_unused(ctx, set_up(view, stage, plan.device, batches, None, plan.recipe.distributed, has_val,
                                           plan.data.class_names, plan.precision))
    cache = featurize(view, plan.data, plan.device, plan.recipe.cache, spec, ctx.reporter,
                      splits=splits_read_by(stage, plan.stages), precision=plan.precision)
    ctx.skipped.update(cache.skipped)
    # Held until the fit ends: `featurize --force` must not swap the cache out from under it.
    ctx.locks.enter_context(file_lock(read_lock(cache.path), shared=True))
    batches = CacheBatches(cache, plan.device, stage.fine_tune.batch_size, plan.recipe.cache.memory_mib,
                           balanced=spec.sampler == "balanced")
    return _told_unused(ctx, set_up(view, stage, plan.device, batches, cache, plan.recipe.distributed, has_val,
                                       plan.data.class_names, plan.precision))


def _told_unused(ctx: FitContext, setup: StageSetup) -> StageSetup:
    """Warns of each setting the stage, once set up, ignores: what `optimizer: auto` resolved to
    does not read (explicit choices were told when the recipe was read), or what the network
    gives nothing to act on."""
    recipe, stage = ctx.plan.recipe, setup.stage
    warnings = ignored_by_optimizer(recipe, stage, setup.ft.optimizer) if stage.fine_tune.optimizer == "auto" else []
    for key, why in setup.unused.items():
        if key == "sampler":  # a data key, read in another way rather than ignored
            warnings.append(recipe.problem(("data", "sampler"), f"balanced: {why}"))
        else:
            warnings += ignored_keys(recipe, stage, (key,), why)
    for warning in dict.fromkeys(map(str, warnings)) if ctx.plan.dist.main else ():
        ctx.reporter.warn(warning)
    return setup


def _choose_probe_l2(ctx: FitContext, setup: StageSetup, state) -> None:
    """The probe's L2: the recipe's weight_decay, the one a resumed run chose, or the best on val."""
    if setup.probe is None:
        return
    resumed = state is not None and state.stage == setup.stage.index and state.epoch > 0 and state.l2 is not None
    if setup.ft.weight_decay > 0 or resumed or not setup.has_val:
        setup.probe.l2 = setup.ft.weight_decay or (state.l2 if resumed else L2_WITHOUT_VAL)
        return
    model = setup.view.model
    start = {k: v.detach().clone() for k, v in model.state_dict().items() if k in ctx.trained}

    def fit_with(l2: float) -> dict:
        model.load_state_dict(start, strict=False)
        optimizer = make_optimizer(setup.ft, setup.params)
        for _ in range(setup.ft.epochs):
            setup.probe_step(optimizer, l2)
        return evaluate_epoch(setup.forward, setup.batches.val(), ctx.plan.device)

    with one_thread_for_a_small_head(setup, ctx.plan.device):
        setup.probe.l2 = choose_l2(fit_with)
    model.load_state_dict(start, strict=False)
    ctx.reporter.info(f"{setup.stage.name}: linear probe fit, L2 {setup.probe.l2:g} chosen on val")


def _finish_stage(ctx: FitContext, setup: StageSetup, stopper: EarlyStopping, epochs_run: int) -> StageSummary:
    """The model the stage leaves (its best epoch's, under early stopping; the probe folded in)."""
    model = setup.view.model
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state, strict=False)
    refit_rows = None
    if setup.probe is not None:
        if _refits(ctx, setup):
            with one_thread_for_a_small_head(setup, ctx.plan.device):
                refit_rows = setup.refit_probe(max(epochs_run, 1))
            ctx.reporter.info(f"{setup.stage.name}: refit on train + val ({refit_rows} rows) at L2 "
                              f"{setup.probe.l2:g}; the val scores logged are the fit's before, on rows it never saw")
        setup.probe.fold(model)
    ctx.hooks.on_stage_end(setup.stage, model)
    return StageSummary(name=setup.stage.name, input=setup.stage.input, frontier=setup.view.split.frontier_names,
                        epochs_run=epochs_run, best_epoch=stopper.best_epoch or None,
                        trainable_params=setup.trainable_params, optimizer=setup.ft.optimizer,
                        l2=setup.probe.l2 if setup.probe else None, refit_rows=refit_rows)


def _refits(ctx: FitContext, setup: StageSetup) -> bool:
    """Whether the probe fit is refitted on train + val: asked for, with val rows in memory, and
    neither under early stopping (it keeps the epoch that scored best on val, fitted without it)
    nor in a stage that another follows (that stage would start from a head fitted on val, and
    its val scores would no longer be held out: `tl sweep` then chose LP-FT runs by val scores
    of 1.0 that scored below the default on test)."""
    last = setup.stage.index == ctx.plan.stages[-1].index
    return (setup.ft.refit and last and setup.has_val and setup.ft.early_stopping is None
            and setup.batches.val_rows.memory is not None)


def _finish(ctx: FitContext, summaries: list[StageSummary], last_row: dict, cache_key: Optional[str],
            seconds: float) -> FitResult:
    """The checkpoint (written last), the curves, and what the command reports."""
    # Under torchrun each rank decoded its own share of the images: the run lists every rank's skips.
    ctx.skipped = set().union(*distributed.gather(sorted(ctx.skipped), "gathering skipped images"))
    write_checkpoint(ctx, summaries, cache_key)
    # Under torchrun only rank 0 has the log; the others report their last row.
    rows = ctx.run.metrics() if ctx.run.writer else []
    if rows:
        ctx.run.write_picture(CURVES, lambda path: plot_curves(rows, path))
    if ctx.trackers is not None:
        ctx.trackers.finish()
    final, best_kept = _kept_row(rows, summaries[-1], last_row)
    return FitResult(ctx.run.path, sum(s.epochs_run for s in summaries), final, cache_key, seconds, summaries,
                     sorted(ctx.skipped), best_kept, ctx.plan.precision.name)


def _kept_row(rows: list[dict], last: StageSummary, last_row: dict) -> tuple[dict, bool]:
    """The metrics of the model that was kept: the best epoch's under early stopping, else the last."""
    if last.best_epoch and last.best_epoch != last.epochs_run:
        for row in rows:
            if row.get("stage") == last.name and row.get("epoch") == last.best_epoch:
                return row, True
    return (last_row or (rows[-1] if rows else {})), False


def _task_name(stage: Stage) -> str:
    tag = f"{stage.name} ({stage.input}) " if stage.loc or stage.input == "images" else ""
    return f"fit {tag}".strip()


def _status(row: dict, stopper: EarlyStopping) -> str:
    status = f"loss {row['train_loss']:.4f}" + (f"  val_acc {row['val_acc']:.4f}" if "val_acc" in row else "")
    return status + ("  early stop" if stopper.stopped else "")
