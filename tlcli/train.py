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

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tlcli.checkpoint import finished, save_checkpoint, write_json_atomic
from tlcli.data import DataPlan, augmentation, loader, plan_data
from tlcli.errors import RecipeError, RunError
from tlcli.features import FeatureCache, featurize
from tlcli.progress import Reporter
from tlcli.recipe import FineTuneSpec, Recipe, Stage, dump_recipe
from tlcli.surgery import Prepared, prepare
from tlcli.zoo import resolve_device

METRICS = "metrics.jsonl"
TIMINGS = "timings.jsonl"
RESUME = "resume"


@dataclass
class FitResult:
    run_dir: Path
    epochs: int
    final: dict
    cache_key: Optional[str]
    seconds: float
    stages: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- optimizer


def block_of(param_name: str) -> str:
    """The block a parameter belongs to, for discriminative learning rates:
    the name up to its first numeric part (`blocks.5`, `layer4.1`,
    `features.28`), else its top-level module (`conv_head`, `fc`)."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else ""


def _layer_lr(name: str, layer_lr: dict[str, float]) -> Optional[float]:
    """The lr of the longest module name that contains this parameter."""
    best = None
    for module, lr in layer_lr.items():
        if name.startswith(module + ".") and (best is None or len(module) > len(best[0])):
            best = (module, lr)
    return best[1] if best else None


def param_groups(ft: FineTuneSpec, named_params: list[tuple[str, nn.Parameter]], layer_lr: dict[str, float]) -> list[dict]:
    """One group per (lr, weight decay). `named_params` come in execution order.

    - layer_decay: the block nearest the output trains at lr, each block
      further down at lr * layer_decay^distance (fastai's slice, timm's layer decay);
    - layer_lr (from fine_tune.layer_lr or an added layer's own lr) sets a
      module's rate outright;
    - norm weights and biases (1-d) take no weight decay unless decay_norm_and_bias.
    """
    blocks = list(dict.fromkeys(block_of(n) for n, _ in named_params))
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    names: dict[tuple[float, float], list[str]] = {}
    for name, p in named_params:
        lr = ft.lr
        if ft.layer_decay is not None:
            lr *= ft.layer_decay ** (len(blocks) - 1 - blocks.index(block_of(name)))
        own = _layer_lr(name, layer_lr)
        if own is not None:
            lr = own
        wd = ft.weight_decay if (ft.decay_norm_and_bias or p.ndim > 1) else 0.0
        groups.setdefault((lr, wd), []).append(p)
        names.setdefault((lr, wd), []).append(name)
    return [{"params": ps, "lr": lr, "weight_decay": wd, "names": names[(lr, wd)]} for (lr, wd), ps in groups.items()]


def make_optimizer(
    ft: FineTuneSpec, named_params: list[tuple[str, nn.Parameter]], layer_lr: Optional[dict[str, float]] = None
) -> torch.optim.Optimizer:
    groups = param_groups(ft, named_params, layer_lr or {})
    if ft.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov)
    if ft.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=ft.lr, momentum=ft.momentum)
    if ft.optimizer == "adam":
        return torch.optim.Adam(groups, lr=ft.lr)
    return torch.optim.AdamW(groups, lr=ft.lr)


def lr_factor(ft: FineTuneSpec, epoch_progress: float) -> float:
    """The multiplier on `lr` at a point in training, in epochs (fractional)."""
    if epoch_progress < ft.warmup_epochs:
        return epoch_progress / ft.warmup_epochs
    if ft.schedule == "constant":
        return 1.0
    if ft.schedule == "step":
        return ft.step_gamma ** int(epoch_progress // ft.step_epochs)
    span = ft.epochs - ft.warmup_epochs
    t = min(max((epoch_progress - ft.warmup_epochs) / span, 0.0), 1.0)
    if ft.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    # onecycle: up to lr over the first 30% (after any warmup), then cosine down to ~0.
    if t < 0.3:
        return 0.04 + 0.96 * (0.5 - 0.5 * math.cos(math.pi * t / 0.3))
    return 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))


def make_scheduler(ft: FineTuneSpec, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch, so warmup and cosine are smooth within an epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(ft, step / steps_per_epoch))


# --------------------------------------------------------------------------- batches


def cached_batches(
    cache: FeatureCache, split: str, batch_size: int, generator: torch.Generator | None
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """Mini-batches from the cache, one shard in memory at a time. With a
    generator, shard order and rows within a shard are shuffled, reproducibly."""
    shards = cache.shards(split)
    order = torch.randperm(len(shards), generator=generator).tolist() if generator else range(len(shards))
    for i in order:
        frontier, labels = cache.read_shard(shards[i])
        rows = torch.randperm(len(labels), generator=generator) if generator else torch.arange(len(labels))
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            yield [f[idx] for f in frontier], labels[idx]


def image_batches(data) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
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

    def train(self, mode: bool) -> None:
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
        return self.trainable(*inputs)


def run_epoch(model, batches, device, optimizer=None, scheduler=None, ft: FineTuneSpec | None = None, task=None) -> dict:
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
            if task is not None:
                task.advance(len(labels))
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "n": seen}


# --------------------------------------------------------------------------- resume state


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


def _state_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def save_resume(run_dir: Path, state: dict, model: nn.Module, optimizer=None, scheduler=None, best=None) -> None:
    """Epoch-tagged files first, then `state.json` naming them (atomic), then
    the old files go. A kill at any point leaves a consistent previous state."""
    d = run_dir / RESUME
    d.mkdir(parents=True, exist_ok=True)
    tag = f"s{state['stage']}-e{state['epoch']:04d}"
    files = {"model": f"model-{tag}.safetensors"}
    _atomic(lambda p: save_file(_state_cpu(model), str(p)), d / files["model"])
    if optimizer is not None:
        files["optim"] = f"optim-{tag}.pt"
        _atomic(lambda p: torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, p), d / files["optim"])
    if best is not None:
        files["best"] = f"best-{tag}.safetensors"
        _atomic(lambda p: save_file(best, str(p)), d / files["best"])
    write_json_atomic(d / "state.json", {**state, "files": files})
    for f in d.iterdir():
        if f.name != "state.json" and f.name not in files.values():
            f.unlink(missing_ok=True)


def _atomic(write, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    write(part)
    os.replace(part, path)


def read_resume(run_dir: Path) -> Optional[dict]:
    try:
        return json.loads((run_dir / RESUME / "state.json").read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- fit


def _saved_recipe(recipe: Recipe) -> str:
    """The resolved recipe as stored in the run. A checkpoint base is made
    absolute, so the run can be evaluated and resumed from anywhere."""
    if recipe.base.checkpoint is not None:
        base = recipe.base.model_copy(update={"checkpoint": str(Path(recipe.base.checkpoint).expanduser().resolve())})
        recipe = recipe.model_copy(update={"base": base})
    return dump_recipe(recipe)


def _check_run_dir(recipe: Recipe, run_dir: Path, force: bool, resume: bool) -> Optional[dict]:
    state = read_resume(run_dir)
    if resume:
        if finished(run_dir):
            raise RunError(f"{run_dir} holds a finished run; nothing to resume (pass --force to train it again)")
        if state is None:
            raise RunError(f"{run_dir}: no interrupted run to resume (no {RESUME}/state.json); run tl fit without --resume")
        saved = (run_dir / "recipe.yaml").read_text() if (run_dir / "recipe.yaml").is_file() else None
        if saved != _saved_recipe(recipe):
            raise RunError(f"{run_dir}: the recipe changed since this run started; resume needs the same recipe "
                           "(pass --force to start over)")
        return state
    if force:
        return None
    if finished(run_dir):
        raise RunError(f"{run_dir} already holds a finished run; pass --force to overwrite it")
    if state is not None:
        raise RunError(f"{run_dir} holds an interrupted run (stage {state['stage'] + 1}, epoch {state['epoch']}); "
                       "pass --resume to continue it or --force to start over")
    return None


def fit(recipe: Recipe, reporter: Reporter = Reporter(), force: bool = False, resume: bool = False) -> FitResult:
    run_dir = Path(recipe.output_dir)
    state = _check_run_dir(recipe, run_dir, force, resume)
    started = time.perf_counter()
    device = resolve_device(recipe.device)
    plan = plan_data(recipe)
    stages = recipe.stage_plan()
    prepared = prepare(recipe, plan.class_names)
    for s in stages:
        if s.fine_tune.early_stopping is not None and not plan.splits.get("val"):
            loc = (*s.loc, "fine_tune", "early_stopping") if s.loc else ("fine_tune", "early_stopping")
            raise RecipeError([recipe.problem(loc, "early stopping watches the validation split; set data.split.val > 0")])

    if state is None:
        if run_dir.exists():
            # Starting over: nothing of the old run may be mistaken for this one's.
            for name in (RESUME, "checkpoint.json", "model.safetensors", METRICS, TIMINGS, "curves.png", "eval"):
                p = run_dir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(_saved_recipe(recipe))
        (run_dir / METRICS).write_text("")
        (run_dir / TIMINGS).write_text("")
        start_stage = 0
    else:
        start_stage = state["stage"]
        # The model as it was after the saved epoch (or stage); _fit_stage restores the rest.
        prepared.model.load_state_dict(load_file(str(run_dir / RESUME / state["files"]["model"])), strict=True)
        # Drop metrics rows written after the saved epoch (the killed epoch's, if any).
        for name in (METRICS, TIMINGS):
            rows = (run_dir / name).read_text().splitlines()[: state["rows"]]
            (run_dir / name).write_text("".join(r + "\n" for r in rows))
        reporter.info(f"resuming {run_dir} at stage {start_stage + 1}, after epoch {state['epoch']}")

    rows_written = state["rows"] if state else 0
    summaries: list[dict] = list(state.get("summaries", [])) if state else []
    last_row: dict = {}
    cache_key = None
    for stage in stages[start_stage:]:
        resume_here = state if state is not None and state["stage"] == stage.index else None
        outcome = _fit_stage(recipe, stage, prepared, plan, device, reporter, run_dir, resume_here, rows_written, summaries)
        rows_written, last_row = outcome["rows"], outcome["last_row"] or last_row
        cache_key = outcome["cache_key"] or cache_key
        summaries.append(outcome["summary"])
        state = None
        # The stage is done: a resume from here starts the next stage with this model.
        save_resume(run_dir, {"stage": stage.index + 1, "epoch": 0, "rows": rows_written, "summaries": summaries},
                    prepared.model)

    final = prepared.for_freeze(recipe, stages[-1].freeze)
    transfer = final.transfer_model()
    transfer.to("cpu")
    save_checkpoint(run_dir, transfer, {
        "model": recipe.base.describe(),
        "head_layer": prepared.head_layer,
        "class_names": plan.class_names,
        "preprocess": prepared.preprocess.to_dict(),
        "frontier": final.split.frontier_names,
        "cache_key": cache_key,
        "data_fingerprint": plan.fingerprint(),
        "stages": summaries,
    })
    shutil.rmtree(run_dir / RESUME, ignore_errors=True)
    plot_curves(run_dir / METRICS, run_dir / "curves.png")
    epochs = sum(s["epochs_run"] for s in summaries)
    return FitResult(run_dir, epochs, last_row, cache_key, time.perf_counter() - started, summaries)


def _apply_dropout(model: nn.Module, frozen_modules: list[str], p: Optional[float]) -> None:
    if p is None:
        return
    frozen = set(frozen_modules)
    inside_frozen = tuple(f + "." for f in frozen_modules)
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and name not in frozen and not name.startswith(inside_frozen):
            m.p = p


def _fit_stage(recipe: Recipe, stage: Stage, base: Prepared, plan: DataPlan, device, reporter: Reporter,
               run_dir: Path, state: Optional[dict], rows_written: int, summaries: list[dict]) -> dict:
    ft = stage.fine_tune
    prepared = base.for_freeze(recipe, stage.freeze)
    on_images = stage.input == "images"
    cache = None if on_images else featurize(recipe, prepared, plan, device, reporter)
    model = StageModel(prepared, on_images, device, ft.train_bn)
    _apply_dropout(prepared.model, model.transfer.frozen_modules, ft.dropout)
    params = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
    if not params:
        loc = (*stage.loc, "freeze") if stage.loc else ("freeze",)
        raise RecipeError([recipe.problem(loc, "everything is frozen: there is nothing left to train")])
    optimizer = make_optimizer(ft, params, {**base.layer_lr, **ft.layer_lr})
    if on_images:
        steps_per_epoch = math.ceil(len(plan.splits["train"]) / ft.batch_size)
        augment = augmentation(stage.augment, prepared.preprocess) if stage.augment is not None else None
    else:
        steps_per_epoch = sum(math.ceil(s["rows"] / ft.batch_size) for s in cache.manifest["splits"]["train"]["shards"])
        augment = None
    scheduler = make_scheduler(ft, optimizer, max(steps_per_epoch, 1))
    has_val = bool(plan.splits.get("val"))
    es = ft.early_stopping
    best_value, best_epoch, best_state, bad_epochs, first_epoch = None, 0, None, 0, 1
    if state is not None and state["epoch"] > 0:
        files = state["files"]
        saved = torch.load(run_dir / RESUME / files["optim"], weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        best_value, best_epoch, bad_epochs = state["best_value"], state["best_epoch"], state["bad_epochs"]
        best_state = load_file(str(run_dir / RESUME / files["best"])) if "best" in files else None
        first_epoch = state["epoch"] + 1

    stage_tag = f"{stage.name} ({'images' if on_images else 'cache'}) " if recipe.stages or on_images else ""
    last_row: dict = {}
    epoch = first_epoch - 1
    stopped = False
    if state is not None and state.get("stopped"):
        stopped = True
    with reporter.task(f"fit {stage_tag}".strip(), total=ft.epochs, unit="epoch") as task, \
            open(run_dir / METRICS, "a") as log, open(run_dir / TIMINGS, "a") as timing_log:
        task.advance(first_epoch - 1)
        for epoch in range(first_epoch, ft.epochs + 1):
            if stopped:
                break
            t0 = time.perf_counter()
            seed = epoch_seed(ft.seed, stage.index, epoch)
            torch.manual_seed(seed)  # dropout, augmentation (in-process)
            shuffle = torch.Generator().manual_seed(seed)
            lr = max(g["lr"] for g in optimizer.param_groups)
            if on_images:
                train_batches = image_batches(loader(plan.splits["train"], prepared.preprocess, ft.batch_size,
                                                     recipe.data.num_workers, augment, shuffle))
            else:
                train_batches = cached_batches(cache, "train", ft.batch_size, shuffle)
            train = run_epoch(model, train_batches, device, optimizer, scheduler, ft)
            row = {"stage": stage.name, "epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "lr": lr}
            if has_val:
                if on_images:
                    val_batches = image_batches(loader(plan.splits["val"], prepared.preprocess, 256, recipe.data.num_workers))
                else:
                    val_batches = cached_batches(cache, "val", 1024, None)
                val = run_epoch(model, val_batches, device)
                row.update(val_loss=val["loss"], val_acc=val["acc"])
            # Wall time varies run to run; it goes to its own file so that
            # metrics.jsonl is identical for identical seeds.
            log.write(json.dumps(row) + "\n")
            log.flush()
            timing_log.write(json.dumps({"stage": stage.name, "epoch": epoch, "seconds": round(time.perf_counter() - t0, 4)}) + "\n")
            timing_log.flush()
            rows_written += 1
            last_row = row
            if es is not None:
                value = row[es.monitor]
                better = best_value is None or (
                    value > best_value + es.min_delta if es.monitor == "val_acc" else value < best_value - es.min_delta
                )
                if better:
                    best_value, best_epoch, bad_epochs = value, epoch, 0
                    best_state = _state_cpu(prepared.model)
                else:
                    bad_epochs += 1
                stopped = bad_epochs >= es.patience
            save_resume(
                run_dir,
                {"stage": stage.index, "epoch": epoch, "rows": rows_written, "best_value": best_value,
                 "best_epoch": best_epoch, "bad_epochs": bad_epochs, "stopped": stopped, "summaries": summaries},
                prepared.model, optimizer, scheduler, best_state,
            )
            status = f"loss {row['train_loss']:.4f}" + (f"  val_acc {row['val_acc']:.4f}" if has_val else "")
            task.advance(1, status=status + ("  early stop" if stopped else ""))
    if best_state is not None:
        # Early stopping keeps the best epoch's model, not the last one.
        prepared.model.load_state_dict(best_state, strict=True)
    return {
        "rows": rows_written,
        "last_row": last_row,
        "cache_key": cache.key if cache is not None else None,
        "summary": {
            "name": stage.name,
            "input": stage.input,
            "frontier": prepared.split.frontier_names,
            "epochs_run": epoch,
            "best_epoch": best_epoch or None,
            "trainable_params": sum(p.numel() for _, p in params),
        },
    }


def plot_curves(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    x = list(range(1, len(rows) + 1))  # epochs counted across stages
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in rows], label="train")
    ax_acc.plot(x, [r["train_acc"] for r in rows], label="train")
    if "val_loss" in rows[0]:
        ax_loss.plot(x, [r["val_loss"] for r in rows], label="val")
        ax_acc.plot(x, [r["val_acc"] for r in rows], label="val")
    # Mark where each later stage starts.
    for i in range(1, len(rows)):
        if rows[i].get("stage") != rows[i - 1].get("stage"):
            for ax in (ax_loss, ax_acc):
                ax.axvline(x[i] - 0.5, color="grey", linestyle="--", linewidth=0.8)
                ax.text(x[i] - 0.4, ax.get_ylim()[1], rows[i]["stage"], va="top", fontsize=8, color="grey")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
