"""A fit's named steps that are not the loop itself: what it shares, early stopping, restoring a resume, writing.

Reproducibility: every source of randomness in an epoch (shuffle order,
dropout, augmentation) is seeded from (seed, stage, epoch), so resuming at
an epoch boundary replays what an uninterrupted run does, with the trained
tensors, optimizer, scheduler, early-stopping state and stage restored from
the last epoch's resume state. The resume state holds only tensors some
stage trains; the rest is rebuilt from the recipe and pinned by a hash.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tlcli.config.schema import EarlyStoppingSpec
from tlcli.config.stages import Stage
from tlcli.data.pipeline import jpeg_decoder
from tlcli.engine.plan import Plan
from tlcli.engine.stage import StageSetup
from tlcli.errors import RunError
from tlcli.model.weights import hash_tensors
from tlcli.progress import Reporter
from tlcli.run.checkpoint import save_checkpoint
from tlcli.run.records import CheckpointMeta, ResumeState, StageSummary
from tlcli.run.rundir import RunDir
from tlcli.run.tracking import Trackers


class FitHooks:
    """Observers of a fit (tests, integrations). Each hook sees live objects: look, don't change."""

    def on_train_epoch_end(self, stage: Stage, epoch: int, model) -> None:
        """After an epoch's training pass, before validation; the model is still in train mode."""

    def on_stage_end(self, stage: Stage, net: torch.nn.Module) -> None:
        """After a stage, with the model it leaves (the best epoch's, with early stopping)."""


@dataclass
class FitContext:
    """What every stage of one fit shares: the plan, the run it writes, and what it learns on the way."""

    plan: Plan
    run: RunDir
    reporter: Reporter
    hooks: FitHooks
    skipped: set[str] = field(default_factory=set)  # undecodable files left out (data.on_bad_image: skip)
    trackers: Optional[Trackers] = None  # tracking.to's trackers (the process that writes the run only)
    locks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # released when the fit ends
    # State-dict names some stage trains: resume files hold only these. The rest
    # is rebuilt from the recipe and pinned by `frozen_hash`.
    trained: set[str] = field(default_factory=set)
    frozen_hash: Optional[str] = None

    def trained_state(self) -> dict[str, torch.Tensor]:
        # clone(): safetensors refuses tensors that share storage (tied weights, views).
        return {k: v.detach().to("cpu").clone().contiguous()
                for k, v in self.plan.network.model.state_dict().items() if k in self.trained}


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


# --------------------------------------------------------------------------- restore


def pin_frozen(ctx: FitContext) -> None:
    """Which tensors some stage trains (resume saves those), and a hash of all the others."""
    model = ctx.plan.network.model
    state = model.state_dict()
    for s in ctx.plan.stages:
        ctx.trained |= set(state) - set(ctx.plan.network.splits[s.index].frozen_state_names(model))
    ctx.frozen_hash = hash_tensors({k: v for k, v in state.items() if k not in ctx.trained})


def restore_model(ctx: FitContext, state: ResumeState) -> None:
    """The model as it was after the saved epoch (or stage); `restore_stage` restores the rest."""
    if state.frozen_hash is not None and state.frozen_hash != ctx.frozen_hash:
        raise RunError(f"{ctx.run}: the base model's frozen weights changed since this run started; "
                       "resume needs the same weights (pass --force to start over)")
    now = ctx.plan.precision
    if state.precision is not None and state.precision != now.name:
        # `precision: auto` resolves per machine: a run started on an AMX machine in bf16 must not
        # go on in fp32 here (its features, and the head trained on them, would mix both).
        raise RunError(f"{ctx.run}: this run trained in {state.precision}; here it would go on in {now.name} "
                       f"({now.reason}); resume with precision: {state.precision}, or pass --force to start over")
    saved = ctx.run.resume_tensors(state, "model")
    model = ctx.plan.network.model
    unknown = set(saved) - set(model.state_dict())
    if unknown:
        raise RunError(f"{ctx.run}: the resume state does not fit the model ({sorted(unknown)[:3]}); pass --force")
    model.load_state_dict(saved, strict=False)
    ctx.run.rewind_logs(state.rows)


def restore_stage(ctx: FitContext, setup: StageSetup, stopper: EarlyStopping, state: Optional[ResumeState]) -> int:
    """Optimizer, schedule and early stopping as they were after the saved epoch; the next epoch."""
    if state is None or state.epoch == 0:
        return 1
    saved = ctx.run.resume_object(state, "optim")
    setup.optimizer.load_state_dict(saved["optimizer"])
    setup.scheduler.load_state_dict(saved["scheduler"])
    stopper.restore(state, ctx.run.resume_tensors(state, "best"))
    return state.epoch + 1


# --------------------------------------------------------------------------- write


def save_epoch(ctx: FitContext, setup: StageSetup, stopper: EarlyStopping, epoch: int, rows: int,
               summaries: list[StageSummary]) -> None:
    """The resume state after an epoch: trained tensors, best weights, optimizer and schedule."""
    state = ResumeState(stage=setup.stage.index, epoch=epoch, rows=rows, summaries=summaries, frozen_hash=ctx.frozen_hash,
                        l2=setup.probe.l2 if setup.probe else None, precision=ctx.plan.precision.name, **stopper.fields())
    tensors = {"model": ctx.trained_state()}
    if stopper.best_state is not None:
        tensors["best"] = stopper.best_state
    ctx.run.save_resume(state, tensors, {"optim": {"optimizer": setup.optimizer.state_dict(),
                                                   "scheduler": setup.scheduler.state_dict()}})


def save_stage_done(ctx: FitContext, stage: Stage, rows: int, summaries: list[StageSummary]) -> None:
    """The stage is done: a resume from here starts the next stage with this model."""
    ctx.run.save_resume(ResumeState(stage=stage.index + 1, epoch=0, rows=rows, summaries=summaries,
                                    frozen_hash=ctx.frozen_hash, precision=ctx.plan.precision.name),
                        {"model": ctx.trained_state()}, {})


def write_checkpoint(ctx: FitContext, summaries: list[StageSummary], cache_key: Optional[str]) -> None:
    """The finished model and what rebuilds it offline, under the last stage's split."""
    plan = ctx.plan
    final = plan.network.for_stage(plan.stages[-1])
    pinned = final.pinned().to("cpu")
    save_checkpoint(ctx.run, pinned, CheckpointMeta(
        model=plan.recipe.base.describe(), head_layer=final.head_layer, class_names=plan.data.class_names,
        preprocess=final.preprocess, frontier=final.split.frontier_names, cache_key=cache_key,
        data_fingerprint=plan.data.fingerprint(), stages=summaries, decoder=jpeg_decoder(plan.device),
        skipped_images=sorted(ctx.skipped), frozen_modules=pinned.frozen_modules, frozen_attrs=pinned.frozen_attrs,
        precision=plan.precision.name,
    ))
