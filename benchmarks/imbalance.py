"""make imbalance: what fine_tune.class_weights and data.sampler do on a 10:1 imbalanced folder.

    .venv/bin/python benchmarks/imbalance.py

Writes scikit-learn's digits as white-on-black PNGs into a folder pre-split on disk: train/
holds 100 images of each of the digits 0-4 and 10 of each of 5-9 (10:1), val/ and test/ hold
the same number of every digit (the world the model will meet). The embedded Lite0 is frozen
below its head at the quickstart's 112 px, featurized once, and its head fitted six ways: the
default probe fit and adam, each with nothing, `class_weights: balanced` and `sampler:
balanced`. Prints test accuracy, balanced accuracy and macro-F1; asserts nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from head_probe import tl  # the same runner: `python -m tlcli` from the checkout, stderr on failure

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".tl-bench" / "imbalance"
TRAIN = {**{d: 100 for d in range(5)}, **{d: 10 for d in range(5, 10)}}
HELD_OUT = 30  # per digit, in val/ and in test/ each


def imbalanced_folder(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / ".complete").exists():
        return root
    digits = load_digits()
    for digit in range(10):
        picks = np.flatnonzero(digits.target == digit)
        parts = {"val": picks[:HELD_OUT], "test": picks[HELD_OUT:2 * HELD_OUT],
                 "train": picks[2 * HELD_OUT:2 * HELD_OUT + TRAIN[digit]]}
        for split, indices in parts.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(folder / f"{i:04d}.png")
    (root / ".complete").touch()
    return root


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    base = {"base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 112},
            "data": {"imagefolder": str(imbalanced_folder(WORK / "digits-10-to-1"))},
            "freeze": {"until": "global_pool"}, "cache": {"dir": str(WORK / "cache")}}
    print(f"train: {TRAIN[0]} images of each of the digits 0-4, {TRAIN[5]} of each of 5-9; "
          f"test: {HELD_OUT} of every digit")
    print(f"{'head fit':<14}{'option':<26}{'accuracy':>10}{'balanced acc':>14}{'macro-F1':>10}")
    for optimizer in ("auto", "adam"):
        for option, extra in (("none", {}), ("class_weights: balanced", {"fine_tune": {"class_weights": "balanced"}}),
                              ("sampler: balanced", {"data": {"sampler": "balanced"}})):
            name = f"{optimizer}-{option.split(':')[0]}"
            recipe = yaml.safe_load(yaml.safe_dump(base))
            recipe["fine_tune"] = {"optimizer": optimizer, "seed": 0, **extra.get("fine_tune", {})}
            recipe["data"].update(extra.get("data", {}))
            recipe["output_dir"] = str(WORK / f"run-{name}")
            path = WORK / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            tl("fit", "--force", str(path))
            tl("evaluate", str(path))
            m = json.loads((WORK / f"run-{name}" / "eval" / "metrics.json").read_text())
            label = "probe (auto)" if optimizer == "auto" else "adam"
            print(f"{label:<14}{option:<26}{m['accuracy']:>10.4f}{m['balanced_accuracy']:>14.4f}{m['macro_f1']:>10.4f}")


if __name__ == "__main__":
    main()
