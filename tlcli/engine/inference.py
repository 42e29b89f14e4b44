"""Inference: a run's logits on images (through the training pipeline) or on the cached test rows.

Evaluate and predict both score through here, so both see exactly the
decode, resize and normalisation that featurize and fit saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from tlcli.data.pipeline import ImageLoader, decode_threads, jpeg_decoder
from tlcli.engine.device import to_channels_last
from tlcli.engine.cache import cache_key, open_cache
from tlcli.engine.features import key_components
from tlcli.engine.precision import FP32, Precision
from tlcli.errors import DataError, out_of_memory
from tlcli.progress import Reporter


@dataclass
class Scored:
    """Per image: the model's logits, the true label (or index), and where the image came from."""

    logits: np.ndarray
    labels: np.ndarray
    sources: list


def run_forward(run, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The run's model on `device`, computing as its last stage trained: at the run's precision,
    and, after a cache stage, on the frontier as the cache stored it. In fp32 with a float32
    cache that is the full model itself; otherwise the frozen part (under bf16 autocast when
    the run trained so), its outputs rounded to the cache's dtype, then the trainable part, in
    fp32 after a cache stage and under autocast after an image stage."""
    model = to_channels_last(run.model.to(device).eval(), device)
    precision = Precision(run.meta.precision, "the run's")
    on_cache = run.meta.stages[-1].input == "cache"
    store = torch.bfloat16 if on_cache and run.recipe.cache.dtype == "bfloat16" else torch.float32
    if not precision.bf16 and store == torch.float32:
        return model
    extractor = to_channels_last(run.network.extractor().to(device).eval(), device)
    trainable = run.network.trainable().to(device).eval()
    after = FP32 if on_cache else precision

    def forward(x: torch.Tensor) -> torch.Tensor:
        with precision.autocast(device):
            frontier = extractor(x)
        if on_cache:  # what the cache stage trained on: the stored rows, read back as float32
            frontier = [f.to(store).float() for f in frontier]
        with after.autocast(device):
            return trainable(*frontier).float()

    return forward


def model_logits(run, pairs, batch_size, num_workers, device, reporter: Reporter, on_bad_image: str = "error",
                 description: str = "evaluate") -> Scored:
    """The run's logits on (source, label) pairs, batched through the pipeline that featurize
    and fit use: the run's own decode, resize and normalisation, and its precision
    (`run_forward`). With on_bad_image: skip, unreadable files are left out."""
    forward = run_forward(run, device)
    logits, labels = [], []
    batches = ImageLoader(pairs, run.preprocess, batch_size, device, decode_threads(num_workers, device),
                          on_bad_image=on_bad_image)
    lower = "lower data.batch_size (e.g. the override data.batch_size=8)"
    with (reporter.task(description, total=len(pairs), unit="img") as task, torch.inference_mode(),
          out_of_memory(f"{description} (batch {batch_size})", lower)):
        for x, y in batches:
            logits.append(forward(x).float().cpu())
            labels.append(y)
            task.advance(len(y))
    skipped = set(batches.skipped)
    kept = [source for source, _ in pairs if source not in skipped]
    if not logits:
        raise DataError(f"none of the {len(pairs)} image(s) could be decoded (data.on_bad_image: skip left out all of them)")
    return Scored(torch.cat(logits).numpy(), torch.cat(labels).numpy(), kept)


def cached_logits(run, plan, cache_spec, device) -> Optional[Scored]:
    """The test split's logits from the feature cache, when a cache with this run's key exists
    (its dtype, and the precision the run trained at): its rows are what the frozen part
    computes on these very images, as the last stage trained on them, so the trainable part on
    them gives `run_forward`'s output without decoding or running the frozen part. None when
    there is no such cache, or the last stage trained on images (the caller scores the images)."""
    if run.meta.stages[-1].input != "cache":
        return None
    view = run.network
    key = cache_key(key_components(view, plan, view.extractor(), cache_spec.dtype, precision=run.meta.precision,
                                   decoder=jpeg_decoder(device), compiled=cache_spec.compile))
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
