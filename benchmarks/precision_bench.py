"""make precision-bench: what bf16 costs in accuracy and buys in speed, computed and stored apart.

    .venv/bin/python benchmarks/precision_bench.py [digits textures photos science]

Builds four labelled image folders offline (the three of `make sweep-bench`, and crops of
scikit-image's scientific images), each split on disk into train/ and test/. On each, the
embedded Lite0 at 112 px frozen below its head, with the default head (no fine_tune: section),
is fitted four ways: precision fp32 or bf16 (how the frozen part computes), times cache.dtype
float32 or bfloat16 (how the features are stored). Each is scored with `tl evaluate` on test.
Also: featurize images/s in fp32 and bf16, and for the bf16 run the top-1 agreement on test of
tl's scores with the fp32 full model (what `tl export` writes: the export stays fp32).
Prints the CPU's name and flags, and figures; asserts nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".tl-bench" / "precision"
sys.path.insert(0, str(REPO / "benchmarks"))

from sweep_bench import _patches, cpu_name, digits_folder, photos_folder, textures_folder  # noqa: E402

CONFIGS = [("fp32", "float32"), ("bf16", "float32"), ("fp32", "bfloat16"), ("bf16", "bfloat16")]


def science_folder(root: Path) -> Path:
    import skimage.data as d

    names = ("immunohistochemistry", "retina", "hubble_deep_field", "cell", "moon", "text")
    return _patches({n: getattr(d, n)() for n in names}, root, per_class=150, size=48, out=64, scale=(0.5, 1.0))


FOLDERS = {"digits": digits_folder, "textures": textures_folder, "photos": photos_folder, "science": science_folder}


def tl(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "tlcli", *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"tl {' '.join(map(str, args))}:\n{proc.stderr}")
    return proc.stdout


def cpu_flags_line() -> str:
    from tlcli.engine.precision import BF16_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    shown = [f for f in ("avx2", "avx512f", *BF16_CPU_FLAGS, "amx_tile") if f in flags]
    return ", ".join(shown) or "none of avx2, avx512f, avx512_bf16, amx"


def agreement(run_dir: Path) -> float:
    """Top-1 agreement on the test split of tl's scores (the run's precision) with the fp32 full model's."""
    import torch

    from tlcli.data.pipeline import ImageLoader
    from tlcli.data.sources import plan_data
    from tlcli.engine.inference import run_forward
    from tlcli.run.checkpoint import load_checkpoint

    run = load_checkpoint(run_dir)
    cpu = torch.device("cpu")
    ours, plain = [], []
    forward = run_forward(run, cpu)
    pairs = plan_data(run.recipe.data).splits["test"]
    with torch.inference_mode():
        for x, _ in ImageLoader(pairs, run.preprocess, 64, cpu, 2):
            ours.append(forward(x).argmax(1))
            plain.append(run.model.net.eval()(x).float().argmax(1))
    return float((torch.cat(ours) == torch.cat(plain)).double().mean())


def bench(name: str) -> dict:
    work = WORK / name
    folder = FOLDERS[name](work / "folder")
    out = {"name": name, "images": sum(1 for _ in folder.rglob("*.png")), "acc": {}, "featurize_s": {}}
    for precision, dtype in CONFIGS:
        tag = f"{precision}-{dtype}"
        shutil.rmtree(work / tag, ignore_errors=True)
        shutil.rmtree(work / f"cache-{tag}", ignore_errors=True)
        recipe = {"base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 112},
                  "data": {"imagefolder": str(folder), "split": {"val": 0.15, "seed": 0}},
                  "freeze": {"until": "global_pool"}, "device": "cpu", "precision": precision,
                  "cache": {"dir": str(work / f"cache-{tag}"), "dtype": dtype}, "output_dir": str(work / tag)}
        path = work / f"{tag}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        started = time.perf_counter()
        tl("featurize", path, "-q")
        out["featurize_s"][tag] = time.perf_counter() - started
        tl("fit", path, "-q")
        out["acc"][tag] = json.loads(tl("evaluate", path, "--json"))["accuracy"]
    out["agreement"] = agreement(work / "bf16-float32")
    return out


def main() -> None:
    names = sys.argv[1:] or list(FOLDERS)
    if set(names) - set(FOLDERS):
        raise SystemExit(f"usage: precision_bench.py [{' '.join(FOLDERS)}]")
    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores; flags: {cpu_flags_line()}")
    print("Lite0 at 112 px frozen below its head, the default head; test accuracy")
    results = [bench(n) for n in names]
    head = " | ".join(f"{p} {d}" for p, d in CONFIGS)
    print(f"\n| folder (images) | {head} | bf16 - fp32 | featurize s fp32 / bf16 | export (fp32) top-1 agreement |")
    print("|---" * (len(CONFIGS) + 4) + "|")
    for r in results:
        accs = " | ".join(f"{r['acc'][f'{p}-{d}']:.4f}" for p, d in CONFIGS)
        delta = (r["acc"]["bf16-float32"] - r["acc"]["fp32-float32"]) * 100
        print(f"| {r['name']} ({r['images']}) | {accs} | {delta:+.2f} pt | "
              f"{r['featurize_s']['fp32-float32']:.1f} / {r['featurize_s']['bf16-float32']:.1f} | {r['agreement']:.4f} |")
    mean = np.mean([(r["acc"]["bf16-float32"] - r["acc"]["fp32-float32"]) * 100 for r in results])
    stored = np.mean([(r["acc"]["fp32-bfloat16"] - r["acc"]["fp32-float32"]) * 100 for r in results])
    print(f"\nmean bf16 - fp32 (computed): {mean:+.2f} pt; mean bfloat16 - float32 storage (fp32 computed): {stored:+.2f} pt")
    print("targets: bf16 within 0.3 pt of fp32 on average, within 1 pt on each folder")


if __name__ == "__main__":
    main()
