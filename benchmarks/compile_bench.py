"""make compile-bench: does torch.compile of the frozen part pay for itself on a large featurize?

    .venv/bin/python benchmarks/compile_bench.py [--images 5000] [--size 224]

1. The embedded Lite0 frozen below its head (the quickstart's extractor), channels_last, batch
   64, on normalised tensors made once in memory: the eager forward over `--images` images,
   against torch.compile (inductor) of the same module, its compile time (the first batch)
   counted in.
2. The whole `tl featurize` of `--images` photo-like 500x375 JPEGs (make bench's), with
   `cache.compile: false` and `true`: wall seconds, compiling, decoding and writing included.
Prints seconds and the ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def run(model, x: torch.Tensor, batches: int) -> tuple[float, float]:
    """(seconds of the first batch, seconds of all `batches`) of `model` on x."""
    with torch.inference_mode():
        started = time.perf_counter()
        model(x)
        first = time.perf_counter() - started
        for _ in range(batches - 1):
            model(x)
        return first, time.perf_counter() - started


def main() -> None:
    from bench import frozen_lite0

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = 64
    batches = max(args.images // batch, 2)
    model, _ = frozen_lite0(device)
    x = torch.randn(batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    _, eager = run(model, x, batches)
    compiled = torch.compile(model)
    first, total = run(compiled, x, batches)
    with torch.inference_mode():
        same = torch.allclose(model(x)[0], compiled(x)[0], atol=1e-4, rtol=1e-4)
    n = batches * batch
    print(f"Lite0 frozen below its head, {n} images at {args.size} px, batch {batch}, fp32, {device}:")
    print(f"  eager:          {eager:.1f} s ({n / eager:.1f} img/s)")
    print(f"  torch.compile:  {total:.1f} s ({n / total:.1f} img/s) including {first:.1f} s for the first batch (compile)")
    print(f"  compiled / eager: {total / eager:.2f} (below 1: compile wins); outputs allclose(1e-4): {same}")
    print(f"  after the first batch: {(n - batch) / (total - first):.1f} img/s compiled, {n / eager:.1f} eager")

    from bench import photo_folder, recipe_file, run_measured

    work = REPO / ".tl-bench"
    photos = photo_folder(work / f"photos-{args.images}", args.images)
    walls = {}
    for compiled in (False, True):
        recipe = recipe_file(work, f"compile-{compiled}", photos, cache={"compile": compiled}, data={"batch_size": batch},
                             precision="fp32")
        walls[compiled], _, _ = run_measured([sys.executable, "-m", "tlcli", "featurize", str(recipe), "--force"])
    print(f"`tl featurize` of {args.images} JPEGs: {walls[False]:.1f} s eager, {walls[True]:.1f} s with cache.compile: "
          f"{walls[True] / walls[False]:.2f}")


if __name__ == "__main__":
    main()
