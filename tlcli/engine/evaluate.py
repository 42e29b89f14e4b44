"""Evaluate: score a finished run on its test split (from the cache when it holds the test rows, else the
images) or on another labelled folder, and write eval/: metrics, confusion matrix, top losses, report.

The scores come from the cache's test rows when a float32 cache with the
run's key holds them (the same features as the images give, computed once);
otherwise the full model runs on the raw test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tlcli.data.digests import index_path
from tlcli.data.pipeline import jpeg_decoder, load_sized
from tlcli.data.sources import labelled_folder, plan_data
from tlcli.engine.device import device_for
from tlcli.engine.inference import Scored, cached_logits, model_logits
from tlcli.errors import RunError
from tlcli.files import write_json_atomic
from tlcli.progress import Reporter
from tlcli.report.page import write_report
from tlcli.report.plots import plot_confusion, plot_top_losses
from tlcli.run.checkpoint import Run, load_run
from tlcli.run.rundir import EVAL_CONFUSION, EVAL_CONFUSION_PLOT, EVAL_METRICS, EVAL_REPORT, EVAL_TOP_LOSSES
from tlcli.run.tracking import log_evaluation


@dataclass
class EvalResult:
    run_dir: Path
    out_dir: Path  # eval/, or eval/NAME/ for another data set
    metrics: dict
    warnings: list[str]
    source: str  # "cache": the test split's cached features through the trainable part; "images"
    written: list[str]


def evaluate(target: Optional[Path], reporter: Reporter = Reporter(), device_spec: str | None = None,
             data: Optional[Path] = None, overrides: tuple[str, ...] = ()) -> EvalResult:
    """Score a run: on its own test split (eval/), or on another labelled folder (eval/NAME/)."""
    run = load_run(target, overrides)
    device = device_for(run.recipe, device_spec)
    warnings: list[str] = []
    if data is not None:
        scored, source = _score_folder(run, Path(data), device, reporter), "images"
        out = run.dir.eval_dir(_folder_name(Path(data)))
    else:
        scored, source = _score_test_split(run, device, reporter, warnings)
        out = run.dir.eval_dir()
    metrics = {**score(scored.logits, scored.labels, run.class_names), "scored_from": source,
               "precision": run.meta.precision,
               "data": str(Path(data).resolve()) if data is not None else "test split"}
    written = _write_eval(out, metrics, scored, run)
    if run.recipe.tracking.to:
        log_evaluation(run.dir.path, run.recipe.tracking, metrics, out)
    return EvalResult(run.dir.path, out, metrics, warnings, source, written)


def _folder_name(folder: Path) -> str:
    return folder.resolve().name or "data"


def _score_folder(run: Run, folder: Path, device, reporter) -> Scored:
    use = run.recipe.data
    return model_logits(run, labelled_folder(folder, run.class_names), use.batch_size, use.num_workers, device,
                        reporter, use.on_bad_image)


def _score_test_split(run: Run, device, reporter, warnings: list[str]) -> tuple[Scored, str]:
    recipe = run.recipe
    with recipe.located():
        plan = plan_data(recipe.data, index_path(recipe.cache.dir))
    if plan.fingerprint() != run.meta.data_fingerprint:
        warnings.append("the data set has changed since this run was fit; scoring the current test split")
    if plan.class_names != run.class_names:
        raise RunError(f"the data's classes {plan.class_names} differ from the run's {run.class_names}")
    if plan.kind == "files" and run.meta.decoder not in (None, jpeg_decoder(device)):
        warnings.append(f"this run was fit on JPEGs decoded by {run.meta.decoder}; {jpeg_decoder(device)} decodes "
                        "them here (pixels may differ by 1)")
    scored = cached_logits(run, plan, recipe.cache, device)
    if scored is not None:
        return scored, "cache"
    return model_logits(run, plan.splits["test"], recipe.data.batch_size, recipe.data.num_workers, device, reporter,
                        recipe.data.on_bad_image), "images"


def _write_eval(out: Path, metrics: dict, scored: Scored, run: Run) -> list[str]:
    write_json_atomic(out / EVAL_METRICS, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    write_json_atomic(out / EVAL_CONFUSION, {"labels": run.class_names, "matrix": metrics["confusion_matrix"]})
    plot_confusion(np.array(metrics["confusion_matrix"]), run.class_names, out / EVAL_CONFUSION_PLOT, metrics["accuracy"])
    losses = top_losses(scored, run.class_names)
    plot_top_losses([{**item, "image": _as_seen(item["source"], run.preprocess)} for item in losses], out / EVAL_TOP_LOSSES)
    write_report(out / EVAL_REPORT, run.dir, metrics, losses, out)
    return [EVAL_METRICS, EVAL_CONFUSION, EVAL_CONFUSION_PLOT, EVAL_TOP_LOSSES, EVAL_REPORT]


def _as_seen(source, pp) -> np.ndarray:
    """The image as the model saw it (decoded and resized, before normalising), HWC or HW."""
    image = load_sized(source, pp)
    image = image.permute(1, 2, 0).numpy()
    return image[..., 0] if image.shape[2] == 1 else image


def top_losses(scored: Scored, class_names: list[str], k: int = 16) -> list[dict]:
    """The k test images the model got most confidently wrong (highest cross-entropy among
    the misclassified), as fastai's `plot_top_losses` shows them."""
    if not len(scored.labels):
        return []
    logits = torch.from_numpy(scored.logits).double()
    labels = torch.from_numpy(scored.labels).long()
    log_probs = torch.log_softmax(logits, dim=1)
    loss = -log_probs.gather(1, labels[:, None])[:, 0]
    pred = logits.argmax(1)
    wrong = torch.nonzero(pred != labels)[:, 0]
    order = wrong[torch.argsort(loss[wrong], descending=True, stable=True)][:k]
    return [{"source": scored.sources[i], "true": class_names[labels[i]], "predicted": class_names[pred[i]],
             "probability": float(log_probs[i, pred[i]].exp()), "loss": float(loss[i])} for i in order.tolist()]


def score(logits: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = logits.argmax(1)
    # The key is always top5, so that scripts can rely on it; with 5 classes or fewer,
    # every label is among the top five and top5 is 1.0 by definition.
    topk = np.argsort(-logits, axis=1)[:, :5]
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "top5": float((topk == y[:, None]).any(1).mean()),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(f.mean()),
        # The mean recall over the classes the split holds (scikit-learn's balanced_accuracy_score):
        # what accuracy would be if every class were as common.
        "balanced_accuracy": float(r[s > 0].mean()) if (s > 0).any() else 0.0,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
