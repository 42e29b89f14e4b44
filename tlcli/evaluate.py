"""Evaluate: score the *full* checkpointed model on the raw test images (not the cache).

Writes `eval/metrics.json`, `confusion_matrix.json`, `confusion_matrix.png`,
`top_losses.png` and `report.html` into the run directory (`eval/NAME/` for
another labelled folder, `--data`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tlcli.checkpoint import Checkpoint, load_checkpoint
from tlcli.data import labelled_folder, plan_data
from tlcli.errors import DataError, RunError, out_of_memory
from tlcli.features import cache_key, digest_index, key_components, open_cache
from tlcli.files import write_json_atomic
from tlcli.pipeline import ImageLoader, decode_threads, decoder_name, load_sized
from tlcli.plots import plot_confusion, plot_top_losses
from tlcli.report import write_report
from tlcli.progress import Reporter
from tlcli.rundir import EVAL_CONFUSION, EVAL_CONFUSION_PLOT, EVAL_METRICS, EVAL_REPORT, EVAL_TOP_LOSSES, RunDir, find_run
from tlcli.device import device_for


@dataclass
class EvalResult:
    run_dir: Path
    out_dir: Path  # eval/, or eval/NAME/ for another data set
    metrics: dict
    warnings: list[str]
    source: str  # "cache": the test split's cached features through the trainable part; "images"
    written: list[str]


@dataclass
class Scored:
    """Per test image: the model's logits, the true label, and where the image came from."""

    logits: np.ndarray
    labels: np.ndarray
    sources: list


def model_logits(model, pairs, preprocess, batch_size, num_workers, device, reporter,
                 on_bad_image: str = "error", description: str = "evaluate") -> Scored:
    """The full model's logits on (source, label) pairs, batched through the pipeline that
    featurize and fit use: the run's own decode, resize and normalisation. With
    on_bad_image: skip, unreadable files are left out."""
    model.to(device).eval()
    if device.type != "mps":
        model.to(memory_format=torch.channels_last)
    logits, labels = [], []
    batches = ImageLoader(pairs, preprocess, batch_size, device, decode_threads(num_workers, device),
                          on_bad_image=on_bad_image)
    with reporter.task(description, total=len(pairs), unit="img") as task, torch.inference_mode(), \
            out_of_memory(f"{description} (batch {batch_size})", "lower data.batch_size (e.g. the override data.batch_size=8)"):
        for x, y in batches:
            logits.append(model(x).float().cpu())
            labels.append(y)
            task.advance(len(y))
    skipped = set(batches.skipped)
    kept = [source for source, _ in pairs if source not in skipped]
    if not logits:
        raise DataError(f"none of the {len(pairs)} image(s) could be decoded (data.on_bad_image: skip left out all of them)")
    return Scored(torch.cat(logits).numpy(), torch.cat(labels).numpy(), kept)


def evaluate(target: Optional[Path], reporter: Reporter = Reporter(), device_spec: str | None = None,
             data: Optional[Path] = None, overrides: tuple[str, ...] = ()) -> EvalResult:
    """Score a run: on its own test split (eval/), or on another labelled folder (eval/NAME/)."""
    run = find_run(Path(target) if target is not None else None, overrides)
    ckpt = load_checkpoint(run.path)
    # The run's own resolved recipe defines the data and split it was fit on.
    recipe = run.read_recipe(overrides)
    device = device_for(recipe, device_spec)
    warnings: list[str] = []
    if data is not None:
        scored = _score_folder(ckpt, Path(data), recipe, device, reporter)
        source, out = "images", run.eval_dir(_folder_name(Path(data)))
    else:
        scored, source = _score_test_split(ckpt, recipe, device, reporter, warnings)
        out = run.eval_dir()
    metrics = {**score(scored.logits, scored.labels, ckpt.class_names), "scored_from": source,
               "data": str(Path(data).resolve()) if data is not None else "test split"}
    written = _write_eval(out, metrics, scored, ckpt, run)
    return EvalResult(run.path, out, metrics, warnings, source, written)


def _folder_name(folder: Path) -> str:
    return folder.resolve().name or "data"


def _score_folder(ckpt: Checkpoint, folder: Path, recipe, device, reporter) -> Scored:
    pairs = labelled_folder(folder, ckpt.class_names)
    return model_logits(ckpt.model, pairs, ckpt.preprocess, recipe.data.batch_size, recipe.data.num_workers, device,
                        reporter, recipe.data.on_bad_image)


def _score_test_split(ckpt: Checkpoint, recipe, device, reporter, warnings: list[str]) -> tuple[Scored, str]:
    with recipe.located():
        plan = plan_data(recipe.data, digest_index(recipe.cache))
    if plan.fingerprint() != ckpt.meta.data_fingerprint:
        warnings.append("the data set has changed since this run was fit; scoring the current test split")
    if plan.class_names != ckpt.class_names:
        raise RunError(f"the data's classes {plan.class_names} differ from the run's {ckpt.class_names}")
    if plan.kind == "files" and ckpt.meta.decoder not in (None, decoder_name(device)):
        warnings.append(f"this run was fit on JPEGs decoded by {ckpt.meta.decoder}; {decoder_name(device)} decodes "
                        "them here (pixels may differ by 1)")
    scored = cached_logits(ckpt, plan, recipe.cache, device)
    if scored is not None:
        return scored, "cache"
    return model_logits(ckpt.model, plan.splits["test"], ckpt.preprocess, recipe.data.batch_size,
                        recipe.data.num_workers, device, reporter, recipe.data.on_bad_image), "images"


def _write_eval(out: Path, metrics: dict, scored: Scored, ckpt: Checkpoint, run: RunDir) -> list[str]:
    write_json_atomic(out / EVAL_METRICS, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    write_json_atomic(out / EVAL_CONFUSION, {"labels": ckpt.class_names, "matrix": metrics["confusion_matrix"]})
    plot_confusion(np.array(metrics["confusion_matrix"]), ckpt.class_names, out / EVAL_CONFUSION_PLOT, metrics["accuracy"])
    losses = top_losses(scored, ckpt.class_names)
    plot_top_losses([{**item, "image": _as_seen(item["source"], ckpt.preprocess)} for item in losses], out / EVAL_TOP_LOSSES)
    write_report(out / EVAL_REPORT, run, metrics, losses, out)
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


def cached_logits(ckpt: Checkpoint, plan, cache_spec, device) -> Optional[Scored]:
    """The test split's logits from the feature cache, when a float32 cache with this model's key
    exists: its rows are what the frozen part computes on these very images, so the trainable
    part on them gives the full model's output without decoding or running the frozen part."""
    if cache_spec.dtype != "float32":
        return None  # bf16 features differ from the fp32 full model's
    prepared = ckpt.prepared
    key = cache_key(key_components(prepared, plan, prepared.extractor(), cache_spec.dtype, decoder_name(device)))
    cache = open_cache(Path(cache_spec.dir).expanduser() / key)
    if cache is None or cache.count("test") != len(plan.splits.get("test", [])) or not cache.count("test"):
        return None
    trainable = prepared.trainable().to(device).eval()
    logits, labels = [], []
    with torch.inference_mode():
        for frontier, y in cache.iterate("test"):
            logits.append(trainable(*[f.to(device) for f in frontier]).float().cpu())
            labels.append(y)
    # The cache holds the test split's rows in the plan's order.
    return Scored(torch.cat(logits).numpy(), torch.cat(labels).numpy(), [s for s, _ in plan.splits["test"]])


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
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
