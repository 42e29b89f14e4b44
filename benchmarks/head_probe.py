"""make head-probe: does a recipe with the defaults (no fine_tune: section) score what a linear probe scores?

    .venv/bin/python benchmarks/head_probe.py [digits textures photos science]

On the four folders of `make precision-bench` (built offline, each split on disk into
train/ and test/), fits the embedded Lite0 frozen below its head with the defaults at the
quickstart's 112 px, and compares its test accuracy with scikit-learn's LogisticRegression
(C = 1, standardised) on the same cached features, trained on the whole train split (tl's
train and val rows together: tl carves its val out of train/), and on tl's train rows
alone (what the carve-out costs); also with adam at tl's old defaults (lr 0.001, 10
epochs). Prints figures, asserts nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".tl-bench" / "head-probe"
sys.path.insert(0, str(REPO / "benchmarks"))

from precision_bench import FOLDERS  # noqa: E402


def tl(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "tlcli", *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return proc.stdout


def accuracy(recipe: Path) -> float:
    tl("fit", "--force", recipe, "-q")
    return json.loads(tl("evaluate", recipe, "--json"))["accuracy"]


def cached_rows(cache_dir: Path, splits) -> tuple[np.ndarray, np.ndarray]:
    from safetensors.torch import load_file

    cache = next(cache_dir.glob("*/manifest.json")).parent
    parts = [load_file(str(p)) for split in splits for p in sorted(cache.glob(f"{split}-*.safetensors"))]
    return (np.concatenate([p["frontier_0"].float().numpy() for p in parts]),
            np.concatenate([p["labels"].numpy() for p in parts]))


def bench(name: str) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    work = WORK / name
    folder = FOLDERS[name](work / "folder")
    base = {"base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 112},
            "data": {"imagefolder": str(folder)}, "device": "cpu",
            "freeze": {"until": "global_pool"}, "cache": {"dir": str(work / "cache")}}
    defaults, adam = work / "defaults.yaml", work / "adam.yaml"
    defaults.write_text(yaml.safe_dump({**base, "output_dir": str(work / "run-defaults")}))
    adam.write_text(yaml.safe_dump({**base, "fine_tune": {"optimizer": "adam"}, "output_dir": str(work / "run-adam")}))
    out = {"name": name, "defaults": accuracy(defaults), "adam": accuracy(adam)}
    xt, yt = cached_rows(work / "cache", ("test",))
    for key, splits in (("probe", ("train", "val")), ("probe_train_only", ("train",))):
        x, y = cached_rows(work / "cache", splits)
        scaler = StandardScaler().fit(x)
        out[key] = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(x), y).score(scaler.transform(xt), yt)
        out.setdefault("train", len(y))
    out["test"] = len(yt)
    return out


def main() -> None:
    names = sys.argv[1:] or list(FOLDERS)
    if set(names) - set(FOLDERS):
        raise SystemExit(f"usage: head_probe.py [{' '.join(FOLDERS)}]")
    WORK.mkdir(parents=True, exist_ok=True)
    results = [bench(n) for n in names]
    print("test accuracy, Lite0 at 112 px frozen below its head; the probe: scikit-learn LogisticRegression "
          "(C = 1, standardised) on tl's cached train + val features")
    print("\n| folder (train / test) | tl defaults (probe fit) | tl adam, old defaults | LogisticRegression | "
          "defaults - probe | LogisticRegression on tl's train rows only |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} ({r['train']} / {r['test']}) | {r['defaults']:.4f} | {r['adam']:.4f} | {r['probe']:.4f} | "
              f"{100 * (r['defaults'] - r['probe']):+.2f} pt | {r['probe_train_only']:.4f} |")
    print("\ntarget: defaults - probe >= -0.5 pt on every folder")


if __name__ == "__main__":
    main()
