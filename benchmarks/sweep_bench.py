"""make sweep-bench: does `tl sweep` recommend a freeze as good as the best one, at a bounded cost?

    .venv/bin/python benchmarks/sweep_bench.py [digits textures photos]

Builds three labelled image folders offline, each split on disk into train/ and test/
(val is carved from train by tl), at three distances from ImageNet:
  digits    scikit-learn's digits as white-on-black PNGs (far),
  textures  16-px patches of scikit-image's brick, grass, gravel, cell, moon, page, coins, clock (middle),
  photos    24-48 px crops of scikit-image's astronaut, chelsea, coffee, rocket and camera photos (near).
On each, with the embedded Lite0 at 112 px (the quickstart's size, for this 2-core CPU):
  default      the recipe frozen below its head (tl featurize + tl fit), timed, scored on test;
  sweep        tl sweep of the same recipe from an empty cache, timed;
  oracle       every candidate the sweep fitted, scored on test: the best of them;
  recommended  tl fit of sweep/recommended.yaml (from the sweep's caches), scored on test.
Prints the figures the README shows; asserts nothing.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".tl-bench" / "sweep"


def _save(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _split(i: int) -> str:
    return "test" if i % 4 == 0 else "train"


def digits_folder(root: Path) -> Path:
    from sklearn.datasets import load_digits

    if not (root / ".complete").exists():
        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            _save((image * 255 / 16).astype("uint8"), root / _split(i) / str(label) / f"{i:04d}.png")
        (root / ".complete").touch()
    return root


def _patches(sources: dict, root: Path, per_class: int, size: int, out: int, scale=(1.0, 1.0)) -> Path:
    from PIL import Image

    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(0)
    for name, image in sources.items():
        image = np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]
        h, w = image.shape[:2]
        for i in range(per_class):
            side = int(size * rng.uniform(*scale))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = np.rot90(image[y : y + side, x : x + side], rng.integers(4)) if scale == (1.0, 1.0) else \
                image[y : y + side, x : x + side]
            crop = np.clip(crop.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((out, out), Image.BILINEAR))
            _save(crop, root / _split(i) / name / f"{i:04d}.png")
    (root / ".complete").touch()
    return root


def textures_folder(root: Path) -> Path:
    import skimage.data as d

    names = ("brick", "grass", "gravel", "cell", "moon", "page", "coins", "clock")
    # 200 per class: a test split of 400, where one image is 0.25 pt (the targets are 0.5 pt apart).
    return _patches({n: getattr(d, n)() for n in names}, root, per_class=200, size=16, out=32)


def photos_folder(root: Path) -> Path:
    import skimage.data as d

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera")
    # 240 per class: a test split of 300, where one image is 0.33 pt.
    return _patches({n: getattr(d, n)() for n in names}, root, per_class=240, size=48, out=64, scale=(0.5, 1.0))


FOLDERS = {"digits": (digits_folder, "far"), "textures": (textures_folder, "middle"), "photos": (photos_folder, "near")}


def tl(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "tlcli", *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"tl {' '.join(map(str, args))}:\n{proc.stderr}")
    return proc.stdout


def timed(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = tl(*args)
    return time.perf_counter() - started, out


def test_accuracy(target: Path) -> float:
    return json.loads(tl("evaluate", target, "--json"))["accuracy"]


def bench(name: str) -> dict:
    make, distance = FOLDERS[name]
    work = WORK / name
    folder = make(work / "folder")
    recipe = {"base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 112},
              "data": {"imagefolder": str(folder), "split": {"val": 0.15, "seed": 0}},
              "freeze": {"until": "global_pool"}, "fine_tune": {"seed": 0}, "device": "cpu"}
    for kind in ("default", "sweep"):
        shutil.rmtree(work / f"cache-{kind}", ignore_errors=True)  # both start from an empty cache
        shutil.rmtree(work / kind, ignore_errors=True)
        (work / f"{kind}.yaml").write_text(yaml.safe_dump({**recipe, "cache": {"dir": str(work / f"cache-{kind}")},
                                                          "output_dir": str(work / kind)}))
    featurize_s, _ = timed("featurize", work / "default.yaml", "-q")
    fit_s, _ = timed("fit", work / "default.yaml", "-q")
    default = test_accuracy(work / "default")
    sweep_s, out = timed("sweep", work / "sweep.yaml", "--json")
    result = json.loads(out)
    candidates = Path(result["sweep_dir"]) / "candidates"
    tested = {row["id"]: test_accuracy(candidates / row["id"]) for row in result["rows"]}
    oracle = max(tested, key=tested.get)
    fitted = json.loads(tl("fit", result["recommended"], "--json"))
    recommended = test_accuracy(Path(fitted["run_dir"]))
    return {"name": name, "distance": distance, "images": sum(1 for p in folder.rglob("*.png")),
            "default_s": featurize_s + fit_s, "sweep_s": sweep_s, "default": default, "recommended": recommended,
            "choice": result["choice"], "oracle": oracle, "oracle_acc": tested[oracle], "rows": result["rows"],
            "tested": tested, "table": (Path(result["sweep_dir"]) / "table.txt").read_text()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    import os

    names = sys.argv[1:] or list(FOLDERS)
    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; Lite0 at 112 px on the CPU")
    results = [bench(name) for name in names]
    for r in results:
        print(f"\n== {r['name']} ({r['distance']} from ImageNet, {r['images']} images): sweep table (val)")
        print(r["table"].rstrip())
        print("  test accuracy of each candidate: " + ", ".join(f"{k} {v:.4f}" for k, v in r["tested"].items()))
    print("\nfolder     default  recommended (choice)            oracle (best single candidate)   sweep s / default s")
    for r in results:
        print(f"{r['name']:<10} {r['default']:.4f}   {r['recommended']:.4f} ({r['choice']:<22}) "
              f"{r['oracle_acc']:.4f} ({r['oracle']:<22}) {r['sweep_s']:6.1f} / {r['default_s']:5.1f} = "
              f"{r['sweep_s'] / r['default_s']:.2f}x")
    print("\ntargets: recommended >= oracle - 0.005 on every folder; >= default on every folder and by >= 0.01 "
          "on one; sweep <= 3x the default's featurize + fit")


if __name__ == "__main__":
    main()
