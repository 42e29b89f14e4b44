"""Optimizer and schedule: parameter groups, the five optimizers (sgd, adam, adamw, rmsprop, lbfgs), the per-batch learning rate.

Groups carry per-layer and discriminative rates, and no weight decay on
norms and biases unless asked."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from tlcli.config.schema import FineTuneSpec


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
    if ft.optimizer == "lbfgs":
        # Full batch with a line search: the step size is found, not set (lr 1 is its unit step).
        return torch.optim.LBFGS([p for _, p in named_params], lr=1.0, max_iter=20, history_size=20,
                                 line_search_fn="strong_wolfe")
    groups = param_groups(ft, named_params, layer_lr or {})
    if ft.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=ft.lr, momentum=ft.momentum, nesterov=ft.nesterov)
    if ft.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=ft.lr, momentum=ft.momentum)
    if ft.optimizer in ("adam", "auto"):  # auto resolves per stage; adam is its general case
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
    # onecycle: tl's own one-cycle shape, not torch's OneCycleLR (no momentum cycling, no
    # max_lr/div_factor): up from 4% of lr to lr over the first 30% (after any warmup) on a
    # half cosine, then a cosine down to ~0.
    if t < 0.3:
        return 0.04 + 0.96 * (0.5 - 0.5 * math.cos(math.pi * t / 0.3))
    return 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))


def make_scheduler(ft: FineTuneSpec, optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per batch, so warmup and cosine are smooth within an epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(ft, step / steps_per_epoch))
