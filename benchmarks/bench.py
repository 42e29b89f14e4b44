"""make bench: tl against the forward ceiling and hand-written peers, in one run. Prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench.py [--images N] [--work DIR]

On whatever device is present (CUDA when there is one):
  1. forward ceiling of the embedded Lite0 frozen below its head (fp32 and bf16, channels_last,
     tensors already on the device);
  2. `tl featurize` with the data defaults and at the other precision (fp32, bf16), on
     photo-like 500x375 JPEGs made offline from scikit-image's bundled photos, vs both ceilings
     and vs a hand-written DataLoader peer (and, on CUDA, a hand-written nvjpeg peer);
  3. a cache-hit `tl featurize` on 8,192 small files vs `python -c "import torch, torchvision, timm"`;
  4. a head epoch on the cache vs a hand-written in-memory epoch (same head, batch, optimizer),
     bare and doing what tl does beside the steps (one thread, metrics, a val pass);
  5. an image-stage epoch (Lite0 above blocks.5 trained on the JPEGs) in fp32 and bf16, vs a
     hand-written loop on pre-decoded uint8 tensors in memory, in fp32 and bf16;
  6. the cost of checking each shard's digest, shapes and labels as it is read;
  7. featurize peak RSS at 1x and 4x the images.
It prints the CPU's name and flags (which decide `precision: auto`) so a figure names its hardware.
A ratio means most when both sides ran in the same run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
PY = sys.executable


# --------------------------------------------------------------------------- data, made offline


def photo_folder(root: Path, n: int, size=(500, 375), quality: int = 90) -> Path:
    """n photo-like JPEGs in 9 class folders: random crops, colour shifts and flips of
    scikit-image's bundled photos, resized to `size`. Made once per (n, size)."""
    import skimage.data
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    photos = [getattr(skimage.data, name)()[..., :3] for name in
              ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry", "colorwheel",
               "hubble_deep_field", "retina")]
    rng = np.random.default_rng(0)
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = src[y : y + ch, x : x + cw].astype(np.float32) * rng.uniform(0.7, 1.2, 3)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(size, Image.BILINEAR)
        folder = root / f"class{i % len(photos)}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.jpg", quality=quality)
    done.touch()
    return root


def recipe_file(work: Path, name: str, folder: Path, **extra) -> Path:
    recipe = {
        "base": {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded"},
        "data": {"imagefolder": str(folder), "split": {"val": 0.1, "test": 0.2, "seed": 0}},
        "freeze": {"until": "global_pool"},
        "cache": {"dir": str(work / f"cache-{name}")},
        "output_dir": str(work / f"run-{name}"),
    }
    for section, value in extra.items():
        recipe[section] = {**recipe.get(section, {}), **value} if isinstance(value, dict) else value
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_measured(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB of that process alone, stderr) of a fresh subprocess."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode); "
               "sys.stderr.write(p.stderr)")
    proc = subprocess.run([PY, "-c", wrapper, *args], capture_output=True, text=True, cwd=REPO)
    seconds, rss_kib, code = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return float(seconds), int(rss_kib) // 1024, proc.stderr


def tl_featurize(recipe: Path, force: bool = True) -> tuple[float, float, int]:
    """(images/s inside the featurize loop, wall seconds, peak RSS MiB) of `tl featurize`."""
    seconds, rss, _ = run_measured([PY, "-m", "tlcli", "featurize", str(recipe), *(["--force"] if force else [])])
    cache_dir = Path(yaml.safe_load(recipe.read_text())["cache"]["dir"])
    manifest = max((json.loads(m.read_text()) for m in cache_dir.glob("*/manifest.json")), key=lambda m: m["seconds"])
    images = sum(s["count"] for s in manifest["splits"].values())
    return images / manifest["seconds"], seconds, rss


# --------------------------------------------------------------------------- ceiling and peers


def frozen_lite0(device: torch.device):
    from tlcli.model.build import build_network
    from tlcli.config.reading import load_recipe

    prepared = build_network(load_recipe(REPO / "recipes" / "quickstart.yaml"), [str(i) for i in range(10)])
    return prepared.extractor().eval().to(device, memory_format=torch.channels_last), prepared.preprocess


def ceiling(model, device: torch.device, batch: int, bf16: bool, repeats: int) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        model(x)
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
        _sync(device)
    return repeats * batch / (time.perf_counter() - started)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def dataloader_peer(files: list[str], model, device, batch: int, workers: int, bf16: bool) -> float:
    """What a user writes by hand: a Dataset with PIL decode and float transforms, a DataLoader."""
    from PIL import Image
    from torchvision.transforms import v2

    transform = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Resize([224, 224], antialias=True), v2.Normalize([0.5] * 3, [0.5] * 3)])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with Image.open(files[i]) as im:
                return transform(im.convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    started = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for x in loader:
            model(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))[0].cpu()
    return len(files) / (time.perf_counter() - started)


def nvjpeg_peer(files: list[str], model, device, batch: int, threads: int) -> float:
    """Files read by a thread pool, decoded on the GPU by nvjpeg, resized there, bf16 forward."""
    import concurrent.futures

    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as TF

    mean = torch.tensor([0.5] * 3, device=device).view(1, 3, 1, 1)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool, torch.inference_mode(), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(0, len(files), batch):
            data = list(pool.map(read_file, files[i : i + batch]))
            images = decode_jpeg(data, device=device)
            x = torch.stack([TF.resize(im, [224, 224], antialias=True) for im in images]).float().div_(255)
            model(((x - mean) / mean).contiguous(memory_format=torch.channels_last))[0].cpu()
    return len(files) / (time.perf_counter() - started)


def resnet50_rows(work: Path, photos: Path, device, batch: int, repeats: int) -> tuple[float, float]:
    """On CUDA: images/s of `tl featurize` with torchvision's ResNet-50 frozen below its fc
    (random weights: nothing is downloaded on the GPU machine), and its fp32 forward ceiling."""
    from tlcli.config.reading import load_recipe
    from tlcli.model.build import build_network

    recipe = recipe_file(work, "resnet50", photos, precision="fp32", freeze={"until": "avgpool"},
                         base={"zoo": "torchvision", "model": "resnet50", "weights": "none"})
    rate, _, _ = tl_featurize(recipe)
    prepared = build_network(load_recipe(recipe), [str(i) for i in range(3)])
    model = prepared.extractor().eval().to(device, memory_format=torch.channels_last)
    return rate, ceiling(model, device, batch, False, repeats)


# --------------------------------------------------------------------------- start-up and head


def startup(work: Path) -> tuple[float, float]:
    """Median wall time of a cache-hit `tl featurize` on 8,192 small files, and of the imports alone."""
    small = photo_folder(work / "small-8192", 8192, size=(32, 32))
    recipe = recipe_file(work, "startup", small, base={"input_size": 32})
    subprocess.run([PY, "-m", "tlcli", "featurize", str(recipe)], check=True, capture_output=True, cwd=REPO)
    hits = [run_measured([PY, "-m", "tlcli", "featurize", str(recipe)])[0] for _ in range(3)]
    imports = [run_measured([PY, "-c", "import torch, torchvision, timm"])[0] for _ in range(3)]
    return statistics.median(hits), statistics.median(imports)


def head_epochs(work: Path) -> tuple[float, float]:
    """Median seconds of a tl head epoch on the cache (train + val, as timings.jsonl times it), of a
    hand-written in-memory training epoch of the same head, batch and optimizer, and of that
    loop doing what tl does beside the training steps."""
    recipe = work / "startup.yaml"
    r = yaml.safe_load(recipe.read_text())
    # Adam on both sides: the same optimizer as the hand-written loop (the default, auto, would fit
    # this lone head with full-batch L-BFGS, which is a different computation).
    r["fine_tune"] = {"optimizer": "adam", "epochs": 12, "batch_size": 64, "lr": 0.001}
    r["output_dir"] = str(work / "run-head")
    recipe.with_name("head.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    subprocess.run([PY, "-m", "tlcli", "fit", "--force", str(recipe.with_name("head.yaml"))], check=True,
                   capture_output=True, cwd=REPO)
    rows = [json.loads(line) for line in (work / "run-head" / "timings.jsonl").read_text().splitlines()]
    tl_epoch = statistics.median(row["seconds"] for row in rows[2:])

    from safetensors.torch import load_file

    cache = next((work / "cache-startup").glob("*/manifest.json")).parent
    parts = [load_file(str(p)) for p in sorted(cache.glob("train-*.safetensors"))]
    x = torch.cat([p["frontier_0"] for p in parts]).float()
    y = torch.cat([p["labels"] for p in parts])
    val = [load_file(str(p)) for p in sorted(cache.glob("val-*.safetensors"))]
    xv, yv = torch.cat([p["frontier_0"] for p in val]).float(), torch.cat([p["labels"] for p in val])

    def hand(same_work: bool) -> float:
        """The bare training loop; or, with `same_work`, what tl does beside it each epoch: one
        thread (tl's choice for a small head, robust on a busy machine), loss and accuracy
        summed, and a validation pass."""
        before = torch.get_num_threads()
        if same_work:
            torch.set_num_threads(1)
        head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        optimizer = torch.optim.Adam(head.parameters(), lr=0.001)
        times = []
        for epoch in range(12):
            started = time.perf_counter()
            total, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
            for idx in torch.randperm(len(y)).split(64):
                logits = head(x[idx])
                loss = torch.nn.functional.cross_entropy(logits, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if same_work:
                    total += loss.detach().double() * len(idx)
                    correct += (logits.argmax(1) == y[idx]).sum()
            if same_work:
                with torch.no_grad():
                    for i in range(0, len(yv), 256):
                        logits = head(xv[i : i + 256])
                        total += torch.nn.functional.cross_entropy(logits, yv[i : i + 256]).double()
                        correct += (logits.argmax(1) == yv[i : i + 256]).sum()
                total.item(), correct.item()
            times.append(time.perf_counter() - started)
        torch.set_num_threads(before)
        return statistics.median(times[2:])

    return tl_epoch, hand(False), hand(True)


def image_stage_epochs(work: Path, photos: Path, precision: str, epochs: int = 3) -> float:
    """Median seconds of a tl image-stage epoch (train + val) after the first: Lite0 frozen to
    `blocks.5`, everything above it trained on the images, adam at lr 1e-4, batch 32."""
    name = f"stage-{precision}"
    recipe = recipe_file(work, name, photos, freeze={"until": "blocks.5"}, precision=precision,
                         fine_tune={"optimizer": "adam", "lr": 1e-4, "batch_size": 32, "epochs": epochs, "seed": 0},
                         stages=[{"name": "images", "input": "images"}])
    subprocess.run([PY, "-m", "tlcli", "fit", "--force", str(recipe)], check=True, capture_output=True, cwd=REPO)
    rows = [json.loads(line) for line in (work / f"run-{name}" / "timings.jsonl").read_text().splitlines()]
    return statistics.median(row["seconds"] for row in rows[1:])


def hand_stage_epochs(work: Path, photos: Path, bf16: bool, epochs: int = 3) -> float:
    """The same epoch written by hand: the train and val images decoded and sized once, held in
    memory as uint8; per batch, normalise, the frozen part under no_grad, the trainable part and
    adam; channels_last; bf16 autocast when asked, the loss in fp32. Median after the first."""
    from tlcli.config.reading import load_recipe
    from tlcli.data.pipeline import ImageLoader
    from tlcli.data.sources import plan_data
    from tlcli.model.build import build_network

    recipe = load_recipe(work / "stage-fp32.yaml")
    plan = plan_data(recipe.data)
    network = build_network(recipe, plan.class_names)
    pp = network.preprocess
    mean = torch.tensor(pp.mean).view(1, -1, 1, 1)
    std = torch.tensor(pp.std).view(1, -1, 1, 1)

    def held(split):
        xs, ys = [], []
        for x, y in ImageLoader(plan.splits[split], pp, 64, torch.device("cpu"), 2):
            xs.append(((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8))
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    (train_x, train_y), (val_x, val_y) = held("train"), held("val")
    frozen = network.extractor().eval().to(memory_format=torch.channels_last)
    trainable = network.trainable().to(memory_format=torch.channels_last)
    params = [p for p in network.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def batch(u8):
        x = (u8.float() / 255 - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        trainable.train()
        for idx in torch.randperm(len(train_y)).split(32):
            with cast:
                with torch.no_grad():
                    mid = frozen(batch(train_x[idx]))
                logits = trainable(*mid)
            loss = torch.nn.functional.cross_entropy(logits.float(), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        trainable.eval()
        with torch.inference_mode(), cast:
            for idx in torch.arange(len(val_y)).split(32):
                trainable(*frozen(batch(val_x[idx]))).float().argmax(1)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def shard_check_cost(work: Path) -> tuple[float, float, int]:
    """Best-of-5 seconds to read every shard of the photos cache with tl's checks (size,
    digest, shapes, labels), and with a bare `load_file`; the bytes read."""
    from safetensors.torch import load_file

    from tlcli.engine.cache import open_cache

    cache = open_cache(max((work / "cache-photos-fp32").glob("*/manifest.json"), key=lambda m: m.stat().st_mtime).parent)
    names = [name for split in cache.manifest["splits"] for name in cache.shards(split)]

    def best(read) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for name in names:
                read(name)
            times.append(time.perf_counter() - started)
        return min(times)

    checked, bare = best(cache.read_shard), best(lambda name: load_file(str(cache.path / name)))
    return checked, bare, sum((cache.path / name).stat().st_size for name in names)


def image_stage(work: Path, photos: Path, images: int, default_precision: str) -> None:
    stage = {p: image_stage_epochs(work, photos, p) for p in ("fp32", "bf16")}
    hand = {p: hand_stage_epochs(work, photos, p == "bf16") for p in ("fp32", "bf16")}
    faster = min(hand.values())
    print(f"image-stage epoch (Lite0 above blocks.5 trained on {images} JPEGs, train + val): "
          f"tl fp32 {stage['fp32']:.2f} s, tl bf16 {stage['bf16']:.2f} s; hand loop on uint8 tensors in memory fp32 "
          f"{hand['fp32']:.2f} s, bf16 {hand['bf16']:.2f} s; tl / hand loop at the same precision: fp32 "
          f"{stage['fp32'] / hand['fp32']:.2f}, bf16 {stage['bf16'] / hand['bf16']:.2f}; tl with the defaults "
          f"({default_precision}) / the faster hand loop {stage[default_precision] / faster:.2f} (target <= 1.3)")


# --------------------------------------------------------------------------- main


def main() -> None:
    from tlcli.data.pipeline import available_cores

    parser = argparse.ArgumentParser()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=8192 if device.type == "cuda" else 512)
    parser.add_argument("--work", type=Path, default=REPO / ".tl-bench")
    parser.add_argument("--only", choices=["image-stage"], help="run one section alone")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cores = available_cores()
    from tlcli.config.schema import Recipe
    from tlcli.engine.precision import BF16_CPU_FLAGS, cpu_flags, resolve_precision

    spec = Recipe.model_fields["precision"].default
    default_precision = resolve_precision(spec, device).name
    flags = cpu_flags()
    shown = ", ".join(f for f in ("avx2", "avx512f", *BF16_CPU_FLAGS, "amx_tile") if f in flags) or "no AVX2/AVX-512/AMX"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {cores} cores"
    print(f"# tl bench on {name}; torch {torch.__version__}; {args.images} photo-like 500x375 JPEGs")
    from sweep_bench import cpu_name

    print(f"# CPU: {cpu_name()}; flags: {shown}; precision default `{spec}` -> {default_precision} here\n")

    photos = photo_folder(work / f"photos-{args.images}", args.images)
    if args.only == "image-stage":
        return image_stage(work, photos, args.images, default_precision)
    files = sorted(str(p) for p in photos.rglob("*.jpg"))
    model, _ = frozen_lite0(device)
    batch = 256 if device.type == "cuda" else 64
    repeats = 20 if device.type == "cuda" else 3
    fp32 = ceiling(model, device, batch, False, repeats)
    bf16 = ceiling(model, device, batch, True, repeats)
    rates = {}
    for precision in ("fp32", "bf16"):
        rates[precision], _, rss = tl_featurize(recipe_file(work, f"photos-{precision}", photos, precision=precision))
        if precision == default_precision:
            rss_1x = rss
    tl_rate = rates[default_precision]
    peer = dataloader_peer(files, model, device, 64, cores, bf16=False)
    print("| what ran (Lite0 frozen below its head) | images/s | tl (defaults) / this |")
    print("|---|---|---|")
    print(f"| `tl featurize`, data defaults ({default_precision}) | {tl_rate:.1f} | 1.00 |")
    other = "bf16" if default_precision == "fp32" else "fp32"
    print(f"| `tl featurize`, precision: {other} | {rates[other]:.1f} | {tl_rate / rates[other]:.2f} |")
    print(f"| forward ceiling fp32 channels_last, batch {batch} | {fp32:.1f} | {tl_rate / fp32:.2f} |")
    print(f"| forward ceiling bf16 channels_last, batch {batch} | {bf16:.1f} | {tl_rate / bf16:.2f} |")
    print(f"| hand-written DataLoader ({cores} workers, PIL, fp32) | {peer:.1f} | {tl_rate / peer:.2f} |")
    if device.type == "cuda":
        nv = nvjpeg_peer(files, model, device, batch, cores)
        print(f"| hand-written nvjpeg + bf16 | {nv:.1f} | {tl_rate / nv:.2f} |")
        r50_tl, r50_fp32 = resnet50_rows(work, photos, device, batch, repeats)
        print(f"| ResNet-50 `tl featurize` (fp32) / its fp32 ceiling | {r50_tl:.1f} / {r50_fp32:.1f} | "
              f"{r50_tl / r50_fp32:.2f} (target >= 0.5) |")
    print(f"\n`tl featurize` with the defaults / the faster ceiling: {tl_rate / max(fp32, bf16):.2f} (target >= 0.85)")

    hit, imports = startup(work)
    print(f"\ncache-hit `tl featurize` on 8,192 small files: {hit:.2f} s; "
          f"`python -c \"import torch, torchvision, timm\"`: {imports:.2f} s; ratio {hit / imports:.2f} (target <= 1.2)")
    tl_epoch, hand_epoch, same_work = head_epochs(work)
    print(f"head epoch on the cache: tl {tl_epoch * 1000:.1f} ms (train + val); hand-written in-memory "
          f"{hand_epoch * 1000:.1f} ms; ratio {tl_epoch / hand_epoch:.2f} (target <= 1.5); against a hand loop doing "
          f"tl's work too (one thread, metrics, val) {same_work * 1000:.1f} ms: {tl_epoch / same_work:.2f}")

    image_stage(work, photos, args.images, default_precision)

    checked, bare, size = shard_check_cost(work)
    print(f"reading the whole photos cache ({size / 2**20:.1f} MiB): {checked * 1000:.1f} ms with tl's checks (digest, "
          f"shapes, labels), {bare * 1000:.1f} ms bare; +{(checked - bare) * 1000:.1f} ms, "
          f"{(checked - bare) / tl_epoch:.2f} of a head epoch (paid once per stage when the rows fit cache.memory_mib)")

    many = photo_folder(work / f"photos-{4 * args.images}", 4 * args.images)
    _, _, rss_4x = tl_featurize(recipe_file(work, "photos4x", many, precision=default_precision))
    print(f"featurize peak RSS: {rss_1x} MiB at {args.images} images, {rss_4x} MiB at {4 * args.images}; "
          f"ratio {rss_4x / rss_1x:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
