"""Featurize: run the frozen part once per split and cache the frontier tensors.

Layout: `<cache.dir>/<key>/manifest.json` and `<split>-NNNNN.safetensors`
shards. A cache is built in a private `<key>.tmp-<pid>` directory (shards
written atomically, manifest last) and renamed into place, so a killed run
never leaves a directory that looks complete. The key hashes everything that
determines the features; nothing keyed on mtimes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from tlcli.data import DataPlan, loader
from tlcli.progress import Reporter
from tlcli.recipe import Recipe
from tlcli.surgery import Prepared

CACHE_FORMAT = 1
MANIFEST = "manifest.json"


def _hash_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # bf16 and friends have no numpy view; the raw bytes are what matter.
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # hashed in place, no bytes copy
    return h.hexdigest()


def key_components(recipe: Recipe, prepared: Prepared, plan: DataPlan, extractor: torch.fx.GraphModule) -> dict:
    """Everything that determines the cached features, one hash or value each."""
    split = prepared.split
    frozen_names = set(split.frozen_state_names(prepared.model))
    frozen_state = {k: v for k, v in prepared.model.state_dict().items() if k in frozen_names}
    modules = "\n".join(f"{n}: {prepared.model.get_submodule(n)!r}" for n in split.frozen_module_names())
    return {
        "format": CACHE_FORMAT,
        "model": recipe.base.describe(),
        "frontier": split.frontier_names,
        # The frozen graph's code and module configs pin the architecture up to the cut.
        "architecture": hashlib.blake2b((extractor.code + modules).encode(), digest_size=16).hexdigest(),
        "weights": _hash_tensors(frozen_state),
        "preprocess": prepared.preprocess.to_dict(),
        "data": plan.fingerprint(),
        "dtype": recipe.cache.dtype,
    }


def cache_key(components: dict) -> str:
    return hashlib.blake2b(json.dumps(components, sort_keys=True).encode(), digest_size=12).hexdigest()


@dataclass
class FeatureCache:
    """A complete cache on disk, read one shard at a time."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def count(self, split: str) -> int:
        return self.manifest["splits"].get(split, {}).get("count", 0)

    def shards(self, split: str) -> list[str]:
        return [s["file"] for s in self.manifest["splits"].get(split, {}).get("shards", [])]

    def read_shard(self, name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        tensors = load_file(str(self.path / name))
        n = len(self.manifest["frontier"])
        return [tensors[f"frontier_{i}"].float() for i in range(n)], tensors["labels"]

    def iterate(self, split: str) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for name in self.shards(split):
            yield self.read_shard(name)


def open_cache(path: Path) -> Optional[FeatureCache]:
    """The cache at `path` if it is complete and intact, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != CACHE_FORMAT:
        return None
    for split in manifest.get("splits", {}).values():
        for shard in split["shards"]:
            f = path / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["bytes"]:
                return None
    return FeatureCache(path, manifest)


def cache_dir_for(recipe: Recipe, key: str) -> Path:
    return Path(recipe.cache.dir).expanduser() / key


def featurize(
    recipe: Recipe,
    prepared: Prepared,
    plan: DataPlan,
    device: torch.device,
    reporter: Reporter = Reporter(),
    force: bool = False,
) -> FeatureCache:
    """Return the cache for this recipe, building it when missing."""
    extractor = prepared.extractor()
    components = key_components(recipe, prepared, plan, extractor)
    key = cache_key(components)
    final = cache_dir_for(recipe, key)
    existing = open_cache(final)
    if existing is not None and not force:
        reporter.info(f"feature cache hit: {final}")
        return existing
    _remove_dead_partials(final)

    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extractor = extractor.to(device).eval()
    channels_last = device.type != "mps"
    if channels_last:
        extractor = extractor.to(memory_format=torch.channels_last)
    store_dtype = torch.bfloat16 if recipe.cache.dtype == "bfloat16" else torch.float32
    manifest = {
        "format": CACHE_FORMAT,
        "key": key,
        "components": components,
        "frontier": [],
        "class_names": plan.class_names,
        "splits": {},
    }
    started = time.perf_counter()
    for split_name, pairs in plan.splits.items():
        shards, count = [], 0
        buffer: list[list[torch.Tensor]] = []
        labels: list[torch.Tensor] = []
        rows = 0

        def flush() -> None:
            nonlocal buffer, labels, rows
            if not rows:
                return
            tensors = {f"frontier_{i}": torch.cat([b[i] for b in buffer]).contiguous() for i in range(len(buffer[0]))}
            tensors["labels"] = torch.cat(labels)
            name = f"{split_name}-{len(shards):05d}.safetensors"
            part = tmp / (name + ".part")
            save_file(tensors, str(part))
            os.replace(part, tmp / name)
            shards.append({"file": name, "rows": rows, "bytes": (tmp / name).stat().st_size})
            buffer, labels, rows = [], [], 0

        data = loader(pairs, prepared.preprocess, recipe.data.batch_size, recipe.data.num_workers)
        with reporter.task(f"featurize {split_name}", total=len(pairs), unit="img") as task, torch.inference_mode():
            for x, y in data:
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=store_dtype == torch.bfloat16):
                    outs = extractor(x)
                outs = [o.to("cpu", store_dtype).contiguous() for o in outs]
                if not manifest["frontier"]:
                    manifest["frontier"] = [
                        {"name": n, "shape": list(o.shape[1:]), "dtype": str(store_dtype).removeprefix("torch.")}
                        for n, o in zip(prepared.split.frontier_names, outs)
                    ]
                buffer.append(outs)
                labels.append(y.to(torch.int64))
                rows += len(y)
                count += len(y)
                task.advance(len(y))
                if rows >= recipe.cache.shard_size:
                    flush()
            flush()
        manifest["splits"][split_name] = {"count": count, "shards": shards}
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    # The manifest is written last: its presence is what marks a cache complete.
    part = tmp / (MANIFEST + ".part")
    part.write_text(json.dumps(manifest, indent=1))
    os.replace(part, tmp / MANIFEST)
    if final.exists():
        shutil.rmtree(final)  # stale, damaged, or --force
    os.replace(tmp, final)
    reporter.info(f"feature cache written: {final}")
    cache = open_cache(final)
    assert cache is not None, "a cache just written must open"
    return cache


def _remove_dead_partials(final: Path) -> None:
    """Partial builds left by killed runs (their pid is gone) are garbage."""
    if not final.parent.is_dir():
        return
    for path in final.parent.glob(f"{final.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def featurize_recipe(recipe: Recipe, reporter: Reporter = Reporter(), force: bool = False) -> list[FeatureCache]:
    """`tl featurize`: build the cache of every stage that trains from one."""
    from tlcli.data import plan_data
    from tlcli.surgery import prepare
    from tlcli.zoo import resolve_device

    plan = plan_data(recipe)
    prepared = prepare(recipe, plan.class_names)
    device = resolve_device(recipe.device)
    caches = []
    for stage in recipe.stage_plan():
        if stage.input == "cache":
            caches.append(featurize(recipe, prepared.for_freeze(recipe, stage.freeze), plan, device, reporter, force=force))
    return caches
