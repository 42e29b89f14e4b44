"""Predict: a trained run's top-k classes for image files, folders or globs.

The images go through `inference.model_logits`, the pipeline that featurize,
fit and evaluate use, so that predict sees exactly what training saw.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from tlcli.data.sources import listed_extensions, visible_images
from tlcli.engine.device import device_for
from tlcli.engine.inference import model_logits
from tlcli.errors import DataError
from tlcli.files import claim_outputs, write_text_atomic
from tlcli.progress import Reporter
from tlcli.run.checkpoint import load_run


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first


@dataclass
class PredictResult:
    run_dir: Path
    top_k: int
    predictions: list[Prediction]
    skipped: list[str]  # files that could not be decoded (data.on_bad_image: skip)

    def to_json(self) -> dict:
        return {"run_dir": str(self.run_dir), "top_k": self.top_k, "skipped": self.skipped,
                "predictions": [{"path": p.path, "top": [{"class": c, "probability": prob} for c, prob in p.top]}
                                for p in self.predictions]}

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["path"] + [f"{kind}_{i}" for i in range(1, self.top_k + 1) for kind in ("class", "probability")])
        for p in self.predictions:
            writer.writerow([p.path] + [v for c, prob in p.top for v in (c, f"{prob:.6f}")])
        return buffer.getvalue()


def predict(target: Optional[Path], patterns: list[str], top_k: int = 5, reporter: Reporter = Reporter(),
            device_spec: Optional[str] = None, overrides: tuple[str, ...] = (),
            csv_path: Optional[Path] = None, force: bool = False) -> PredictResult:
    if csv_path is not None:
        claim_outputs([Path(csv_path)], force)  # before any work: a refusal costs nothing
    run = load_run(target, overrides)
    files = image_files(patterns)
    device = device_for(run.recipe, device_spec)
    use = run.recipe.data
    # Labels are file indices: they say which file each row is, even when some are skipped.
    pairs = [(path, i) for i, path in enumerate(files)]
    scored = model_logits(run, pairs, use.batch_size, use.num_workers, device, reporter, use.on_bad_image,
                          description="predict")
    k = max(1, min(top_k, len(run.class_names)))
    probs = torch.softmax(torch.from_numpy(scored.logits).double(), dim=1)
    values, indices = probs.topk(k, dim=1)
    predictions = [Prediction(files[index], [(run.class_names[c], float(v)) for v, c in zip(vs, cs)])
                   for index, vs, cs in zip(scored.labels.tolist(), values.tolist(), indices.tolist())]
    kept = {p.path for p in predictions}
    result = PredictResult(run.dir.path, k, predictions, [f for f in files if f not in kept])
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(csv_path), result.to_csv())
    return result


def image_files(patterns: list[str]) -> list[str]:
    """Files, folders (searched recursively) and globs, as image paths in a stable order.
    A pattern that names no image is an error: a typo must not predict on nothing."""
    import glob

    found: list[str] = []
    for pattern in patterns:
        matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))] if glob.has_magic(pattern) else [Path(pattern)]
        images = []
        for path in matches:
            if path.is_dir():
                images += list(visible_images(path))
            elif path.is_file():
                images.append(path)
        if not images:
            raise DataError(f"{pattern}: no image files there (extensions: {listed_extensions()})")
        found += [str(p) for p in images]
    return list(dict.fromkeys(found))
