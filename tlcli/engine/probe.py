"""Linear probe: fit a single Linear head on cached features the way logistic regression is fitted.

When a cache stage trains exactly one Linear layer on one flat frontier
tensor, and its rows are held in memory, `optimizer: auto` fits it like a
linear probe: inputs standardised with the train rows' mean and std, the
whole train split as one batch, L-BFGS with a line search, and an L2
penalty chosen on the validation split; then, once the epochs are done, the
same fit again on train + val at that L2 (`fine_tune.refit`). At the end of
the stage the standardisation is folded into the Linear layer (W/std,
b - W.mean), so the saved model keeps its shape and takes the raw features.

Why: on digits as PNGs (Lite0 features), adam with tl's old defaults (lr
0.001, 10 epochs) scored 0.922 on test where scikit-learn's standardised
LogisticRegression scored 0.964; this fit scores 0.967, in under a second.
Standardising alone made adam worse (it overfits 1280 standardised inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

# L2 penalties tried on the validation split when the recipe leaves weight_decay at 0.
L2_GRID = (1e-4, 1e-3, 1e-2)
# Without a validation split: about scikit-learn's C=1 for a thousand rows.
L2_WITHOUT_VAL = 1e-3


@dataclass
class Probe:
    head: str  # the Linear module's name in the model
    mean: torch.Tensor
    std: torch.Tensor
    l2: Optional[float] = None  # chosen (or given) before the epochs start

    def fold(self, model: nn.Module) -> None:
        """Fold the standardisation into the head: it then takes raw features."""
        linear = model.get_submodule(self.head)
        with torch.no_grad():
            weight = linear.weight / self.std.to(linear.weight)
            linear.bias.sub_(weight @ self.mean.to(linear.weight))
            linear.weight.copy_(weight)


def restandardize(probe: Probe, head: nn.Linear, parts: list[torch.Tensor]) -> None:
    """Standardises the rows of `parts` (already standardised with the probe's statistics) again,
    in place, with the statistics of all of them together; the probe's statistics (in raw units)
    and the head follow, so that the head computes what it did on the same raw rows:
    z = m + s z' makes W z + b = (W s) z' + (b + W m). The parts are not joined: the refit reads
    train and val where the cache holds them, within `cache.memory_mib`."""
    m, s = pooled_mean_std(parts)
    for x in parts:
        x.sub_(m.to(x.dtype)).div_(s.to(x.dtype))
    with torch.no_grad():
        head.bias.add_(head.weight @ m.to(head.weight))
        head.weight.mul_(s.to(head.weight))
    probe.mean = probe.mean + probe.std * m.to(probe.mean)
    probe.std = probe.std * s.to(probe.std)


def pooled_mean_std(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-column mean and (biased) std of the parts' rows taken together, as `standardize`
    computes them on one tensor (a constant column's std is 1), without joining the parts: each
    part's mean and variance, pooled in float64 (Chan et al.'s parallel formula)."""
    count, mean, m2 = 0, None, None
    for x in parts:
        if not len(x):
            continue
        var_b, mean_b = torch.var_mean(x.float(), dim=0, correction=0)
        n_b, mean_b, var_b = len(x), mean_b.double(), var_b.double()
        if mean is None:
            count, mean, m2 = n_b, mean_b, var_b * n_b
            continue
        delta, total = mean_b - mean, count + n_b
        mean = mean + delta * (n_b / total)
        m2 = m2 + var_b * n_b + delta.pow(2) * (count * n_b / total)
        count = total
    std = (m2 / count).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean.float(), std.float()


def probe_head(trainable: torch.fx.GraphModule, frontier_shapes: list[list[int]]) -> Optional[str]:
    """The Linear layer's name when the trainable part is one Linear (with a bias) on one flat input."""
    calls = [n for n in trainable.graph.nodes if n.op not in ("placeholder", "output")]
    if len(calls) != 1 or calls[0].op != "call_module" or len(frontier_shapes) != 1 or len(frontier_shapes[0]) != 1:
        return None
    module = trainable.get_submodule(calls[0].target)
    return calls[0].target if isinstance(module, nn.Linear) and module.bias is not None else None


def standardize(train: list[torch.Tensor], others: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise the (single) frontier tensor of train and the other splits in place, with train's statistics."""
    x = train[0]
    mean = x.float().mean(0)
    std = x.float().std(0, unbiased=False)
    # A constant feature is left unscaled: dividing by ~0 would blow up its weight when folded.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    mean, std = mean.to(x.dtype), std.to(x.dtype)
    for tensors in [train, *others]:
        if tensors:
            tensors[0].sub_(mean).div_(std)
    return mean, std


def lbfgs_epoch(model, inputs: list[torch.Tensor], labels: torch.Tensor, optimizer: torch.optim.LBFGS,
                l2: float, weights: list[torch.Tensor], class_weight: Optional[torch.Tensor] = None) -> dict:
    """One L-BFGS step (up to 20 iterations) on the whole train split; then its loss and accuracy.
    `class_weight`: per-class weights of the loss (fine_tune.class_weights)."""
    model.train(True)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), labels, weight=class_weight) + 0.5 * l2 * sum(w.pow(2).sum() for w in weights)
        loss.backward()
        return loss

    optimizer.step(closure)
    model.train(False)
    with torch.no_grad():
        logits = model(inputs)
        loss = F.cross_entropy(logits, labels, weight=class_weight).item()
        correct = (logits.argmax(1) == labels).sum().item()
    return {"loss": loss, "acc": correct / max(len(labels), 1), "n": len(labels)}


def lbfgs_step_on_parts(model, parts: list[tuple[list[torch.Tensor], torch.Tensor]], optimizer: torch.optim.LBFGS,
                        l2: float, weights: list[torch.Tensor], class_weight: Optional[torch.Tensor] = None) -> None:
    """One L-BFGS step on rows held in several parts (the refit's train and val): the objective of
    `lbfgs_epoch` on their concatenation, the weighted mean cross-entropy over all rows (weighted
    as F.cross_entropy weighs: by the rows' class weights) plus the penalty, with no joined copy."""
    total = sum(float(len(labels)) if class_weight is None else class_weight[labels].sum().item()
                for _, labels in parts)
    model.train(True)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(model(inputs), labels, weight=class_weight, reduction="sum")
                   for inputs, labels in parts) / total
        loss = loss + 0.5 * l2 * sum(w.pow(2).sum() for w in weights)
        loss.backward()
        return loss

    optimizer.step(closure)
    model.train(False)


def choose_l2(fit: Callable[[float], dict]) -> float:
    """The L2 whose fit scores best on val (accuracy, then loss); `fit(l2)` trains from the
    same start and returns the val metrics."""
    scored = []
    for l2 in L2_GRID:
        val = fit(l2)
        scored.append((-val["acc"], val["loss"], l2))
    return min(scored)[2]


def fold_of(n: int, folds: int, seed: int) -> torch.Tensor:
    """Each row's fold: a seeded permutation dealt round-robin, so the folds differ in size by one at most."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(n, dtype=torch.long)
    out[order] = torch.arange(n) % folds
    return out


def cross_validation_mib(rows: int, features: int, classes: int, l2s: int = 1, folds: int = 5) -> float:
    """About the memory `cross_validated` takes, in MiB: the rows, and per fold and L2 the
    weights and the logits with their gradients (float32, four copies of each at most)."""
    return 4 * (rows * features + 4 * l2s * folds * (features * classes + rows * classes)) / 2**20


def cross_validated(x: torch.Tensor, labels: torch.Tensor, classes: int, l2_grid=L2_GRID, folds: int = 5,
                    seed: int = 0, iterations: int = 100) -> tuple[float, float]:
    """(accuracy, l2): the probe's k-fold cross-validated accuracy on the rows `x` (n, d), at the
    best L2 of `l2_grid`, each fold standardised with its own training rows' statistics.

    Why: a sweep compares a dozen probes on a val split of a few hundred images, where one image
    is half a point and the best of twelve val scores is mostly luck; five folds over train+val
    score every row once. All folds and L2s are fitted together, as one sum of independent
    convex problems (its minimum is each one's): one L-BFGS run instead of folds x L2s."""
    n, d = x.shape
    held = F.one_hot(fold_of(n, folds, seed), folds).bool()  # (n, k): row i is held out of fold k
    trains = (~held).float()
    count = trains.sum(0)  # (k,)
    # Each fold's statistics in float64 about the overall mean, so E[x^2] - E[x]^2 keeps its digits.
    centred = x.double() - x.double().mean(0)
    mean = (trains.T.double() @ centred) / count[:, None].double()  # (k, d)
    std = ((trains.T.double() @ centred.pow(2)) / count[:, None].double() - mean.pow(2)).clamp_min(0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std)).float()
    mean = (mean + x.double().mean(0)).float()
    x = x.float()
    l2 = torch.tensor(l2_grid, dtype=torch.float32)
    weight = torch.zeros(len(l2_grid), folds, d, classes, dtype=torch.float32, requires_grad=True)
    bias = torch.zeros(len(l2_grid), folds, classes, dtype=torch.float32, requires_grad=True)
    target = labels.long()

    def logits() -> torch.Tensor:
        # On standardised inputs: ((x - mean_k) / std_k) @ W + b, without a copy of x per fold.
        w = weight / std[None, :, :, None]
        b = bias - torch.einsum("kd,lkdc->lkc", mean, w)
        return torch.einsum("nd,lkdc->lknc", x, w) + b[:, :, None, :]

    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad(set_to_none=True)
        out = logits()
        losses = F.cross_entropy(out.reshape(-1, classes), target.repeat(len(l2_grid) * folds),
                                 reduction="none").view(len(l2_grid), folds, n)
        loss = ((losses * trains.T).sum(-1) / count).sum() + 0.5 * (l2 * weight.pow(2).sum((1, 2, 3))).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        right = (logits().argmax(-1) == target).float()  # (l, k, n)
        accuracy = (right * held.T.float()).sum((1, 2)) / n  # every row scored once, in its own fold
    best = int(torch.argmax(accuracy))
    return float(accuracy[best]), float(l2_grid[best])
