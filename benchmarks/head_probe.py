"""make head-probe: does a recipe with the defaults (no fine_tune: section) score what a linear probe scores?

    .venv/bin/python benchmarks/head_probe.py

Writes scikit-learn's digits as PNGs (an image folder, offline), fits the embedded
Lite0 frozen below its head with the defaults at the quickstart's 112 px, and compares its test accuracy with
scikit-learn's LogisticRegression on the same cached features, standardised; and with
adam at tl's old defaults (lr 0.001, 10 epochs). Prints figures, asserts nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".tl-bench" / "head-probe"


def digits_folder(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    if (root / ".complete").exists():
        return root
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # White ink on black, as a PNG of them comes out and as tl renders the built-in digits.
        Image.fromarray((image * 255 / 16).astype("uint8")).save(folder / f"{i:04d}.png")
    (root / ".complete").touch()
    return root


def tl(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tlcli", *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return proc.stdout


def accuracy(recipe: Path) -> float:
    tl("fit", "--force", str(recipe))
    line = next(l for l in tl("evaluate", str(recipe)).splitlines() if l.startswith("test accuracy"))
    return float(line.split()[2])


def main() -> None:
    from safetensors.torch import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    WORK.mkdir(parents=True, exist_ok=True)
    base = {"base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 112},
            "data": {"imagefolder": str(digits_folder(WORK / "digits-white-on-black")), "split": {"val": 0.1, "test": 0.25, "seed": 0}},
            "freeze": {"until": "global_pool"}, "cache": {"dir": str(WORK / "cache")}}
    defaults = WORK / "defaults.yaml"
    defaults.write_text(yaml.safe_dump({**base, "output_dir": str(WORK / "run-defaults")}))
    old = WORK / "adam.yaml"
    old.write_text(yaml.safe_dump({**base, "fine_tune": {"optimizer": "adam"}, "output_dir": str(WORK / "run-adam")}))
    tl_defaults, tl_adam = accuracy(defaults), accuracy(old)

    cache = next((WORK / "cache").glob("*/manifest.json")).parent

    def rows(split):
        parts = [load_file(str(p)) for p in sorted(cache.glob(f"{split}-*.safetensors"))]
        return np.concatenate([p["frontier_0"].float().numpy() for p in parts]), np.concatenate([p["labels"].numpy() for p in parts])

    (x, y), (xt, yt) = rows("train"), rows("test")
    scaler = StandardScaler().fit(x)
    probe = LogisticRegression(max_iter=5000).fit(scaler.transform(x), y).score(scaler.transform(xt), yt)
    print(f"test accuracy on digits as PNGs (n={len(yt)}), Lite0 frozen below its head:")
    print(f"  tl, recipe with the defaults (probe fit):        {tl_defaults:.4f}")
    print(f"  tl, optimizer: adam at the old defaults:         {tl_adam:.4f}")
    print(f"  scikit-learn LogisticRegression, standardised:   {probe:.4f}")
    print(f"  defaults - probe: {100 * (tl_defaults - probe):+.2f} pt (target >= -0.5 pt)")


if __name__ == "__main__":
    main()
