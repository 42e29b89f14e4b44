"""Evaluate: score the *full* checkpointed model on the raw test images (not the cache).

Writes `eval/metrics.json`, `eval/confusion_matrix.json` and
`eval/confusion_matrix.png` into the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tlcli.checkpoint import Checkpoint, load_checkpoint
from tlcli.data import plan_data
from tlcli.errors import RunError
from tlcli.features import cache_key, digest_index, key_components, open_cache
from tlcli.files import write_json_atomic
from tlcli.pipeline import ImageLoader, decode_threads, decoder_name
from tlcli.plots import plot_confusion
from tlcli.progress import Reporter
from tlcli.recipe import load_recipe
from tlcli.rundir import EVAL_CONFUSION, EVAL_CONFUSION_PLOT, EVAL_METRICS, RunDir
from tlcli.zoo import resolve_device


@dataclass
class EvalResult:
    run_dir: Path
    metrics: dict
    warnings: list[str]
    source: str  # "cache": the test split's cached features through the trainable part; "images"


def run_dir_of(target: Path) -> Path:
    if target.is_dir():
        return target
    if target.suffix in (".yaml", ".yml") or target.is_file():
        return Path(load_recipe(target).output_dir)
    raise RunError(f"{target}: neither a run directory nor a recipe file")


def predict(model, pairs, preprocess, batch_size, num_workers, device, reporter,
            on_bad_image: str = "error") -> tuple[np.ndarray, np.ndarray]:
    model.to(device).eval()
    if device.type != "mps":
        model.to(memory_format=torch.channels_last)
    logits, labels = [], []
    batches = ImageLoader(pairs, preprocess, batch_size, device, decode_threads(num_workers, device),
                          on_bad_image=on_bad_image)
    with reporter.task("evaluate", total=len(pairs), unit="img") as task, torch.inference_mode():
        for x, y in batches:
            logits.append(model(x).float().cpu())
            labels.append(y)
            task.advance(len(y))
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate(target: Path, reporter: Reporter = Reporter(), device_spec: str | None = None) -> EvalResult:
    run = RunDir(run_dir_of(Path(target)))
    ckpt = load_checkpoint(run.path)
    # The run's own resolved recipe defines the data and split it was fit on.
    recipe = run.read_recipe()
    with recipe.located():
        plan = plan_data(recipe.data, digest_index(recipe.cache))
    warnings = []
    if plan.fingerprint() != ckpt.meta.data_fingerprint:
        warnings.append("the data set has changed since this run was fit; scoring the current test split")
    if plan.class_names != ckpt.class_names:
        raise RunError(f"{run}: the data's classes {plan.class_names} differ from the run's {ckpt.class_names}")
    with recipe.located():
        device = resolve_device(device_spec or recipe.device)
    if plan.kind == "files" and ckpt.meta.decoder not in (None, decoder_name(device)):
        warnings.append(f"this run was fit on JPEGs decoded by {ckpt.meta.decoder}; {decoder_name(device)} decodes "
                        "them here (pixels may differ by 1)")
    scored = cached_logits(ckpt, plan, recipe.cache, device)
    source = "cache" if scored is not None else "images"
    logits, y = scored if scored is not None else predict(
        ckpt.model, plan.splits["test"], ckpt.preprocess, recipe.data.batch_size, recipe.data.num_workers, device, reporter,
        recipe.data.on_bad_image)
    metrics = {**score(logits, y, ckpt.class_names), "scored_from": source}
    out = run.eval_dir()
    write_json_atomic(out / EVAL_METRICS, {k: v for k, v in metrics.items() if k != "confusion_matrix"})
    write_json_atomic(out / EVAL_CONFUSION, {"labels": ckpt.class_names, "matrix": metrics["confusion_matrix"]})
    plot_confusion(np.array(metrics["confusion_matrix"]), ckpt.class_names, out / EVAL_CONFUSION_PLOT, metrics["accuracy"])
    return EvalResult(run.path, metrics, warnings, source)


def cached_logits(ckpt: Checkpoint, plan, cache_spec, device) -> Optional[tuple[np.ndarray, np.ndarray]]:
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
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def score(logits: np.ndarray, y: np.ndarray, class_names: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = logits.argmax(1)
    k = min(5, logits.shape[1])
    topk = np.argsort(-logits, axis=1)[:, :k]
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        f"top{k}": float((topk == y[:, None]).any(1).mean()),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "macro_f1": float(f.mean()),
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
