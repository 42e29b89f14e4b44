"""Fit: train the trainable part on the cached frontier tensors.

The trainable subgraph shares its parameters with the full model, so the
trained weights are the full model's weights; the checkpoint saves the full
model. Frozen parameters never reach the optimizer, so neither updates nor
weight decay can touch them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from tlcli.checkpoint import finished, save_checkpoint
from tlcli.data import plan_data
from tlcli.errors import RecipeError, RunError
from tlcli.features import FeatureCache, featurize
from tlcli.progress import Reporter
from tlcli.recipe import FineTuneSpec, Recipe, dump_recipe
from tlcli.surgery import prepare
from tlcli.zoo import resolve_device

METRICS = "metrics.jsonl"


@dataclass
class FitResult:
    run_dir: Path
    epochs: int
    final: dict
    cache_key: str
    seconds: float


def make_optimizer(ft: FineTuneSpec, named_params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """Frozen parameters never get here; norm weights and biases (1-d tensors)
    go into a no-decay group unless `decay_norm_and_bias`."""
    decay = [p for n, p in named_params if ft.decay_norm_and_bias or p.ndim > 1]
    no_decay = [p for n, p in named_params if not ft.decay_norm_and_bias and p.ndim <= 1]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if ft.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov, weight_decay=ft.weight_decay)
    if ft.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)
    if ft.optimizer == "adam":
        return torch.optim.Adam(groups, lr=ft.lr, weight_decay=ft.weight_decay)
    return torch.optim.AdamW(groups, lr=ft.lr, weight_decay=ft.weight_decay)


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


def run_epoch(model, batches, device, optimizer=None, scheduler=None, ft: FineTuneSpec | None = None) -> dict:
    training = optimizer is not None
    smoothing = ft.label_smoothing if ft and training else 0.0
    clip = ft.grad_clip if ft and training else None
    clipped = [p for g in optimizer.param_groups for p in g["params"]] if clip else []
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for frontier, labels in batches:
            frontier = [f.to(device, non_blocking=True) for f in frontier]
            labels = labels.to(device, non_blocking=True)
            logits = model(*frontier)
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
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "n": seen}


def fit(recipe: Recipe, reporter: Reporter = Reporter(), force: bool = False) -> FitResult:
    run_dir = Path(recipe.output_dir)
    if finished(run_dir) and not force:
        raise RunError(f"{run_dir} already holds a finished run; pass --force to overwrite it")
    started = time.perf_counter()
    device = resolve_device(recipe.device)
    plan = plan_data(recipe)
    prepared = prepare(recipe, len(plan.class_names))
    cache = featurize(recipe, prepared, plan, device, reporter)

    transfer = prepared.transfer_model()  # marks frozen parameters requires_grad=False
    trainable = prepared.trainable().to(device)
    params = [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]
    if not params:
        raise RecipeError([recipe.problem(("freeze", "until"), "everything is frozen: there is nothing left to train")])
    ft = recipe.fine_tune
    optimizer = make_optimizer(ft, params)
    steps_per_epoch = sum(
        math.ceil(shard["rows"] / ft.batch_size) for shard in cache.manifest["splits"]["train"]["shards"]
    )
    scheduler = make_scheduler(ft, optimizer, max(steps_per_epoch, 1))
    generator = torch.Generator().manual_seed(ft.seed)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    metrics_path = run_dir / METRICS
    metrics_path.write_text("")
    has_val = cache.count("val") > 0
    row: dict = {}
    with reporter.task("fit", total=ft.epochs, unit="epoch") as task, open(metrics_path, "a") as log:
        for epoch in range(1, ft.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train = run_epoch(trainable, cached_batches(cache, "train", ft.batch_size, generator), device, optimizer, scheduler, ft)
            row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], "lr": lr}
            if has_val:
                val = run_epoch(trainable, cached_batches(cache, "val", 1024, None), device)
                row.update(val_loss=val["loss"], val_acc=val["acc"])
            row["seconds"] = round(time.perf_counter() - t0, 4)
            log.write(json.dumps(row) + "\n")
            log.flush()
            status = f"loss {row['train_loss']:.4f}" + (f"  val_acc {row['val_acc']:.4f}" if has_val else "")
            task.advance(1, status=status)

    transfer.to("cpu")
    save_checkpoint(
        run_dir,
        transfer,
        {
            "zoo": recipe.base.zoo,
            "model": recipe.base.model,
            "weights": recipe.base.weights.describe(),
            "head_layer": prepared.head_layer,
            "class_names": plan.class_names,
            "preprocess": prepared.preprocess.to_dict(),
            "boundary": recipe.freeze.nodes,
            "frontier": prepared.split.frontier_names,
            "cache_key": cache.key,
            "data_fingerprint": cache.manifest["components"]["data"],
            "epochs": ft.epochs,
        },
    )
    plot_curves(metrics_path, run_dir / "curves.png")
    return FitResult(run_dir, ft.epochs, row, cache.key, time.perf_counter() - started)


def plot_curves(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_acc.plot(epochs, [r["train_acc"] for r in rows], label="train")
    if "val_loss" in rows[0]:
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val")
        ax_acc.plot(epochs, [r["val_acc"] for r in rows], label="val")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
