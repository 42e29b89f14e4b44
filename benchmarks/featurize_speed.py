"""Featurize throughput of the embedded Lite0 on digits, in images/s: prints figures, asserts nothing.

    .venv/bin/python benchmarks/featurize_speed.py [N_IMAGES]

Compares the layouts tl can use for the frozen forward (fp32 NCHW, fp32
channels_last, bf16 autocast + channels_last) on the same preprocessed batch,
then times tl's own featurize loop end to end (decode + resize + forward + write).
"""

import sys
import tempfile
import time

import torch

from tlcli.data import loader, plan_data
from tlcli.features import featurize
from tlcli.recipe import load_recipe
from tlcli.build import prepare

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
recipe = load_recipe("recipes/quickstart.yaml")
recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"limit": n})})
with tempfile.TemporaryDirectory() as tmp:
    recipe = recipe.model_copy(update={"cache": recipe.cache.model_copy(update={"dir": tmp})})
    plan = plan_data(recipe.data)
    prepared = prepare(recipe, plan.class_names)
    extractor = prepared.extractor().eval()
    x = next(iter(loader(plan.splits["train"], prepared.preprocess, 32, 0)))[0]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {tuple(x.shape)}")
    for label, fmt, bf16 in [("fp32 NCHW", torch.contiguous_format, False), ("fp32 channels_last", torch.channels_last, False),
                             ("bf16 autocast channels_last", torch.channels_last, True)]:
        m = extractor.to(memory_format=fmt)
        xb = x.contiguous(memory_format=fmt)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            m(xb)
            t0 = time.perf_counter()
            for _ in range(3):
                m(xb)
        print(f"forward {label:>30}: {3 * len(xb) / (time.perf_counter() - t0):6.1f} img/s")
    t0 = time.perf_counter()
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data)
    total = sum(cache.count(s) for s in ("train", "val", "test"))
    print(f"tl featurize end to end (fp32 channels_last): {total / (time.perf_counter() - t0):6.1f} img/s over {total} images")
