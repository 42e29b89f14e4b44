"""Inference: a run's logits on images (through the training pipeline) or on the cached test rows.

Evaluate and predict both score through here, so both see exactly the
decode, resize and normalisation that featurize and fit saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tlcli.data.pipeline import ImageLoader, decode_threads, jpeg_decoder
from tlcli.engine.device import to_channels_last
from tlcli.engine.cache import cache_key, open_cache
from tlcli.engine.features import key_components
from tlcli.errors import DataError, out_of_memory
from tlcli.progress import Reporter


@dataclass
class Scored:
    """Per image: the model's logits, the true label (or index), and where the image came from."""

    logits: np.ndarray
    labels: np.ndarray
    sources: list


def model_logits(model, pairs, preprocess, batch_size, num_workers, device, reporter: Reporter,
                 on_bad_image: str = "error", description: str = "evaluate") -> Scored:
    """The full model's logits on (source, label) pairs, batched through the pipeline that
    featurize and fit use: the run's own decode, resize and normalisation. With
    on_bad_image: skip, unreadable files are left out."""
    to_channels_last(model.to(device).eval(), device)
    logits, labels = [], []
    batches = ImageLoader(pairs, preprocess, batch_size, device, decode_threads(num_workers, device),
                          on_bad_image=on_bad_image)
    lower = "lower data.batch_size (e.g. the override data.batch_size=8)"
    with (reporter.task(description, total=len(pairs), unit="img") as task, torch.inference_mode(),
          out_of_memory(f"{description} (batch {batch_size})", lower)):
        for x, y in batches:
            logits.append(model(x).float().cpu())
            labels.append(y)
            task.advance(len(y))
    skipped = set(batches.skipped)
    kept = [source for source, _ in pairs if source not in skipped]
    if not logits:
        raise DataError(f"none of the {len(pairs)} image(s) could be decoded (data.on_bad_image: skip left out all of them)")
    return Scored(torch.cat(logits).numpy(), torch.cat(labels).numpy(), kept)


def cached_logits(run, plan, cache_spec, device) -> Optional[Scored]:
    """The test split's logits from the feature cache, when a float32 cache with this run's key
    exists: its rows are what the frozen part computes on these very images, so the trainable
    part on them gives the full model's output without decoding or running the frozen part.
    None when there is no such cache (the caller then scores the images)."""
    if cache_spec.dtype != "float32":
        return None  # bf16 features differ from the fp32 full model's
    view = run.network
    key = cache_key(key_components(view, plan, view.extractor(), cache_spec.dtype, jpeg_decoder(device)))
    cache = open_cache(Path(cache_spec.dir) / key)
    if cache is None or cache.count("test") != len(plan.splits.get("test", [])) or not cache.count("test"):
        return None
    trainable = view.trainable().to(device).eval()
    logits, labels = [], []
    with torch.inference_mode():
        for frontier, y in cache.iterate("test"):
            logits.append(trainable(*[f.to(device) for f in frontier]).float().cpu())
            labels.append(y)
    # The cache holds the test split's rows in the plan's order.
    return Scored(torch.cat(logits).numpy(), torch.cat(labels).numpy(), [s for s, _ in plan.splits["test"]])
