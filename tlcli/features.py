"""Featurize: run the frozen part once per split and cache the frontier tensors on disk.

Layout: `<cache.dir>/<key>/manifest.json` and `<split>-NNNNN.safetensors`
shards. A cache is built in a private `<key>.tmp-<pid>` directory (shards
written atomically, manifest last) and renamed into place, so a killed run
never leaves a directory that looks complete. The key hashes everything that
determines the features; nothing keyed on mtimes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load

from tlcli import distributed
from tlcli.build import Prepared, prepare
from tlcli.data import DataPlan, require_every_class, plan_data, size_hint
from tlcli.errors import DataError, out_of_memory
from tlcli.files import atomic_write, file_lock, fsync_directory, tensors_bytes, write_json_atomic
from tlcli.pipeline import ImageLoader, decode_threads, decoder_name
from tlcli.progress import Reporter
from tlcli.recipe import CacheSpec, DataSpec, Recipe, Stage
from tlcli.device import make_deterministic, resolve_device

# 2: images are resized in uint8 by the pipeline (rounding differs from format 1's float resize).
# 3: the manifest records each shard's digest, checked whenever the shard is read.
CACHE_FORMAT = 3
MANIFEST = "manifest.json"


def hash_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # bf16 and friends have no numpy view; the raw bytes are what matter.
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # hashed in place, no bytes copy
    return h.hexdigest()


def key_components(prepared: Prepared, plan: DataPlan, extractor: torch.fx.GraphModule, dtype: str,
                   decoder: str = "libjpeg-turbo", splits: Optional[Sequence[str]] = None) -> dict:
    """Everything that determines the cached features, one hash or value each; `splits`: which
    of the plan's splits the cache holds (all by default)."""
    split = prepared.split
    frozen_names = set(split.frozen_state_names(prepared.model))
    frozen_state = {k: v for k, v in prepared.model.state_dict().items() if k in frozen_names}
    modules = "\n".join(f"{n}: {prepared.model.get_submodule(n)!r}" for n in split.frozen_module_names())
    return {
        "format": CACHE_FORMAT,
        "model": prepared.model_id,
        "frontier": split.frontier_names,
        # The frozen graph's code and module configs pin the architecture up to the cut.
        "architecture": hashlib.blake2b((extractor.code + modules).encode(), digest_size=16).hexdigest(),
        "weights": hash_tensors(frozen_state),
        "preprocess": prepared.preprocess.to_dict(),
        "data": plan.fingerprint(),
        "dtype": dtype,
        # nvjpeg and libjpeg-turbo differ by +-1 in some pixels; the digits array is not decoded.
        "decoder": decoder if plan.kind == "files" else None,
        "splits": sorted(splits if splits is not None else plan.splits),
    }


def digest_index(cache: CacheSpec) -> Path:
    """Where image digests are remembered between commands: beside the caches they key."""
    return Path(cache.dir).expanduser() / "digests.sqlite"


def cache_key(components: dict) -> str:
    return hashlib.blake2b(json.dumps(components, sort_keys=True).encode(), digest_size=12).hexdigest()


_SHARD_NAME = r"^(train|val|test)-\d{5}\.safetensors$"
_HEX = r"^[0-9a-f]{32}$"


class ShardRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # A plain name inside the cache: a manifest cannot point tl at another file.
    file: str = Field(pattern=_SHARD_NAME)
    rows: int = Field(ge=1, le=10**9)
    bytes: int = Field(ge=1, le=1 << 40)
    digest: str = Field(pattern=_HEX)  # blake2b-128 of the file: a changed shard is damage, not data


class SplitRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=0, le=10**10)
    shards: list[ShardRecord]

    @model_validator(mode="after")
    def _count_is_the_rows(self) -> "SplitRecord":
        if self.count != sum(s.rows for s in self.shards):
            raise ValueError(f"count {self.count} is not the sum of its shards' rows")
        return self


class FrontierRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    shape: list[Annotated[int, Field(ge=1, le=10**7)]] = Field(max_length=6)
    dtype: Literal["float32", "bfloat16"]


class Manifest(BaseModel):
    """`manifest.json`, parsed with bounds: every name stays inside the cache, every count adds up."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal[CACHE_FORMAT]
    key: str = Field(pattern=r"^[0-9a-f]{24}$")
    components: dict
    frontier: list[FrontierRecord] = Field(min_length=1, max_length=64)
    class_names: list[str] = Field(min_length=2, max_length=1_000_000)
    splits: dict[Literal["train", "val", "test"], SplitRecord]
    skipped: list[str] = []
    seconds: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if cache_key(self.components) != self.key:
            raise ValueError("key does not match its components")
        if sorted(self.splits) != sorted(self.components.get("splits", [])):
            raise ValueError(f"splits {sorted(self.splits)} are not the ones keyed {self.components.get('splits')}")
        for name, split in self.splits.items():
            if any(not s.file.startswith(f"{name}-") for s in split.shards):
                raise ValueError(f"split {name} lists another split's shard")
        if not self.splits.get("train") or not self.splits["train"].count:
            raise ValueError("the train split is empty")
        return self


class DamagedCache(DataError):
    """A complete-looking cache whose files do not match its manifest."""


@dataclass
class FeatureCache:
    """A complete cache on disk, read one shard at a time; every shard is checked against its
    manifest entry (digest, rows, shapes, labels) as it is read."""

    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def count(self, split: str) -> int:
        return self.manifest["splits"].get(split, {}).get("count", 0)

    def shards(self, split: str) -> list[str]:
        return [s["file"] for s in self.manifest["splits"].get(split, {}).get("shards", [])]

    @property
    def skipped(self) -> list[str]:
        """Files left out because they could not be decoded (data.on_bad_image: skip)."""
        return self.manifest.get("skipped", [])

    def shard_rows(self, split: str) -> list[int]:
        return [s["rows"] for s in self.manifest["splits"].get(split, {}).get("shards", [])]

    def read_shard(self, name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        record = next((s for split in self.manifest["splits"].values() for s in split["shards"] if s["file"] == name), None)
        if record is None:
            raise self.damaged(f"{name} is not in the manifest")
        data = (self.path / name).read_bytes()
        if len(data) != record["bytes"] or _digest(data) != record["digest"]:
            raise self.damaged(f"{name} is not the file the manifest describes (size or digest differ)")
        try:
            tensors = load(data)
        except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad header
            raise self.damaged(f"{name} is not a readable safetensors file ({err})") from None
        frontier = []
        for i, f in enumerate(self.manifest["frontier"]):
            t = tensors.get(f"frontier_{i}")
            if t is None or list(t.shape) != [record["rows"], *f["shape"]] or str(t.dtype) != f"torch.{f['dtype']}":
                raise self.damaged(f"{name}: frontier_{i} does not have {record['rows']} rows of {f['shape']} {f['dtype']}")
            frontier.append(t.float())
        labels = tensors.get("labels")
        classes = len(self.manifest["class_names"])
        if labels is None or labels.dtype != torch.int64 or list(labels.shape) != [record["rows"]] or (
                len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes):
            raise self.damaged(f"{name}: labels are not {record['rows']} class indices below {classes}")
        return frontier, labels

    def damaged(self, why: str) -> DamagedCache:
        return DamagedCache(f"{self.path}: damaged feature cache ({why}); rebuild it with tl featurize --force")

    def iterate(self, split: str) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for name in self.shards(split):
            yield self.read_shard(name)


def open_cache(path: Path) -> Optional[FeatureCache]:
    """The cache at `path` if it is complete (a manifest that parses, names this directory's
    key, and whose shards are all there at their size), else None: built again, never read."""
    try:
        manifest = Manifest.model_validate(json.loads((path / MANIFEST).read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError):
        return None
    if manifest.key != path.name:
        return None
    for split in manifest.splits.values():
        for shard in split.shards:
            f = path / shard.file
            if not f.is_file() or f.stat().st_size != shard.bytes:
                return None
    return FeatureCache(path, manifest.model_dump(mode="json"))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class ShardWriter:
    """Writes one split's rows as shards, one per *unit*: `unit_batches` consecutive batches of
    the split (about `cache.shard_size` rows). Units are numbered over the whole split and name
    the files, so that ranks that each write every world-th unit produce, together, the files
    a single process writes."""

    def __init__(self, directory: Path, split: str, unit_batches: int, units: list[int]):
        self.directory, self.split, self.unit_batches, self.units = directory, split, unit_batches, units
        self.shards: list[dict] = []
        self._unit: Optional[int] = None
        self._outs: list[list[torch.Tensor]] = []
        self._labels: list[torch.Tensor] = []

    def add(self, outs: list[torch.Tensor], labels: torch.Tensor, batch: int) -> None:
        """`batch`: the batch's index among this writer's batches (skipped batches count)."""
        unit = self.units[batch // self.unit_batches]
        if unit != self._unit:
            self.flush()
            self._unit = unit
        self._outs.append(outs)
        self._labels.append(labels.to(torch.int64))

    def flush(self) -> None:
        if not self._outs:
            return
        tensors = {f"frontier_{i}": torch.cat([b[i] for b in self._outs]).contiguous() for i in range(len(self._outs[0]))}
        tensors["labels"] = torch.cat(self._labels)
        name = f"{self.split}-{self._unit:05d}.safetensors"
        data = tensors_bytes(tensors)
        atomic_write(self.directory / name, data)
        self.shards.append({"unit": self._unit, "file": name, "rows": len(tensors["labels"]), "bytes": len(data),
                            "digest": _digest(data)})
        self._outs, self._labels = [], []

    def summary(self) -> list[dict]:
        self.flush()
        return self.shards


def split_units(n_pairs: int, batch_size: int, shard_size: int) -> tuple[int, int]:
    """(batches per unit, number of units): a unit is whole batches, at least `shard_size` rows."""
    unit_batches = max(1, math.ceil(shard_size / batch_size))
    return unit_batches, math.ceil(n_pairs / (unit_batches * batch_size))


class _Extractor:
    """The frozen part on the device, in the layout and precision the cache asks for."""

    def __init__(self, module: torch.fx.GraphModule, device: torch.device, dtype: str):
        self.device = device
        self.channels_last = device.type != "mps"
        self.module = module.to(device).eval()
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.store_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: a normalised batch on the device (the pipeline's output)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.store_dtype == torch.bfloat16):
            outs = self.module(x)
        return [o.to("cpu", self.store_dtype).contiguous() for o in outs]


def featurize(
    prepared: Prepared,
    plan: DataPlan,
    device: torch.device,
    cache: CacheSpec,
    data: DataSpec,
    reporter: Reporter = Reporter(),
    force: bool = False,
    splits: Optional[Sequence[str]] = None,
) -> FeatureCache:
    """The cache for this model's frozen part and data (the plan's `splits`, all by default),
    built when missing (or forced)."""
    splits = [s for s in plan.splits if splits is None or s in splits]
    extractor = prepared.extractor()
    components = key_components(prepared, plan, extractor, cache.dtype, decoder_name(device), splits)
    key = cache_key(components)
    final = Path(cache.dir).expanduser() / key
    dist = distributed.current()
    # One builder per key: a second featurizer waits here, then finds the cache complete.
    # Under torchrun, rank 0 decides and owns the directory; every rank writes its units.
    with file_lock(_build_lock(final)) if dist.main else contextlib.nullcontext():
        tmp = distributed.broadcast(_start_build(final, key, force) if dist.main else None, "starting the cache")
        if tmp is None:
            if dist.main:
                reporter.info(f"feature cache hit: {final}")
            return _opened(final, plan)
        tmp = Path(tmp)
        try:
            threads = decode_threads(data.num_workers, device)
            with out_of_memory(f"featurizing (batch {data.batch_size})", "lower data.batch_size"):
                part = _write_splits(prepared, plan, splits, _Extractor(extractor, device, cache.dtype), tmp, cache, data,
                                     threads, reporter)
            if dist.enabled:
                reporter.info(f"{dist}: {sum(s['rows'] for shards in part['splits'].values() for s in shards)} rows")
            parts = distributed.gather(part, "gathering the cache's shards")
            if dist.main:
                # The manifest is written last: its presence is what marks a cache complete.
                write_json_atomic(tmp / MANIFEST, {**_manifest(parts, plan, splits), "key": key, "components": components},
                                  commit=True)
                _swap_in(tmp, final, reporter)
        except BaseException:
            if dist.main:
                shutil.rmtree(tmp, ignore_errors=True)  # a kill -9 skips this; the next run removes it (pid gone)
            raise
    distributed.barrier("waiting for the cache to be in place")
    if dist.main:
        reporter.info(f"feature cache written: {final}")
    return _opened(final, plan)


def _start_build(final: Path, key: str, force: bool) -> Optional[str]:
    """None when a complete cache is there (and not forced); else a fresh build directory."""
    if open_cache(final) is not None and not force:
        return None
    _remove_dead_partials(final)
    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return str(tmp)


def _opened(final: Path, plan: DataPlan) -> FeatureCache:
    written = open_cache(final)
    assert written is not None, "a cache just written (or found complete) must open"
    _check_rows(written, plan)
    return written


def _check_rows(cache: FeatureCache, plan: DataPlan) -> None:
    """Every split holds one row per image of the plan, less the images it skipped: a
    manifest that lies about its rows is damage, caught before anything trains on it."""
    skipped = set(cache.skipped)
    for split in cache.manifest["splits"]:
        expected = sum(1 for source, _ in plan.splits.get(split, []) if str(source) not in skipped)
        if cache.count(split) != expected:
            raise cache.damaged(f"split {split} holds {cache.count(split)} rows, the data has {expected} images")
    if "train" in cache.manifest["splits"]:
        require_every_class(plan, skipped)


def _manifest(parts: list[dict], plan: DataPlan, splits: list[str]) -> dict:
    """The ranks' shards, merged into the single-process manifest: shards in unit order."""
    frontier = next((p["frontier"] for p in parts if p["frontier"]), [])
    manifest = {"format": CACHE_FORMAT, "frontier": frontier, "class_names": plan.class_names, "splits": {}}
    for split in splits:
        shards = sorted((s for p in parts for s in p["splits"][split]), key=lambda s: s["unit"])
        manifest["splits"][split] = {"count": sum(s["rows"] for s in shards),
                                     "shards": [{k: v for k, v in s.items() if k != "unit"} for s in shards]}
    position = {str(source): i for split in splits for i, (source, _) in enumerate(plan.splits[split])}
    skipped = sorted({path for p in parts for path in p["skipped"]}, key=lambda path: position.get(path, -1))
    if skipped:
        manifest["skipped"] = skipped
    manifest["seconds"] = max(p["seconds"] for p in parts)
    return manifest


def _build_lock(final: Path) -> Path:
    return final.parent / "locks" / f"{final.name}.build"


def read_lock(final: Path) -> Path:
    """Held shared by every fit that reads the cache; a rebuild swaps only when none does."""
    return final.parent / "locks" / f"{final.name}.read"


def _swap_in(tmp: Path, final: Path, reporter: Reporter) -> None:
    """Replace `final` by the finished `tmp`; never under a fit that has the old one open."""
    with file_lock(read_lock(final), wait=False) as free:
        if not free:
            reporter.info(f"waiting for the fits reading {final} to finish before replacing it")
    with file_lock(read_lock(final)):
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)  # stale, damaged, or --force: out of the way in one rename
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_directory(final.parent)  # the rename into place is what publishes the cache


def _write_splits(prepared: Prepared, plan: DataPlan, splits: list[str], extract: _Extractor, tmp: Path,
                  cache: CacheSpec, data: DataSpec, threads: int, reporter: Reporter) -> dict:
    """This rank's units of every split through the frozen part into shards: its part of the manifest."""
    dist = distributed.current()
    part: dict = {"frontier": [], "splits": {}, "skipped": []}
    dtype_name = str(extract.store_dtype).removeprefix("torch.")
    started = time.perf_counter()
    for split_name in splits:
        pairs = plan.splits[split_name]
        unit_batches, n_units = split_units(len(pairs), data.batch_size, cache.shard_size)
        rows_per_unit = unit_batches * data.batch_size
        mine = list(range(dist.rank, n_units, dist.world))
        my_pairs = [p for u in mine for p in pairs[u * rows_per_unit : (u + 1) * rows_per_unit]]
        writer = ShardWriter(tmp, split_name, unit_batches, mine)
        batches = ImageLoader(my_pairs, prepared.preprocess, data.batch_size, extract.device, threads,
                              on_bad_image=data.on_bad_image)
        with reporter.task(f"featurize {split_name}", total=len(my_pairs), unit="img") as task, torch.inference_mode():
            for x, y in batches:
                outs = extract(x)
                if not part["frontier"]:
                    part["frontier"] = [{"name": n, "shape": list(o.shape[1:]), "dtype": dtype_name}
                                        for n, o in zip(prepared.split.frontier_names, outs)]
                writer.add(outs, y, batches.chunk)
                task.advance(len(y))
        part["splits"][split_name] = writer.summary()
        part["skipped"].extend(batches.skipped)
    part["seconds"] = round(time.perf_counter() - started, 3)
    return part


def _remove_dead_partials(final: Path) -> None:
    """Partial builds left by killed runs (their pid is gone) are garbage."""
    if not final.parent.is_dir():
        return
    for path in [*final.parent.glob(f"{final.name}.tmp-*"), *final.parent.glob(f"{final.name}.old-*")]:
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
    with recipe.located():
        plan = plan_data(recipe.data, digest_index(recipe.cache))
        prepared = prepare(recipe, plan.class_names)
        device = resolve_device(recipe.device)
        make_deterministic(device)
        distributed.init(device, recipe.distributed.timeout_s)
        stages = recipe.stage_plan()
        hint = size_hint(plan, prepared.preprocess.size)
        if hint and distributed.current().main:
            reporter.info(f"hint: {hint}")
        return [featurize(prepared.for_stage(stage), plan, device, recipe.cache, recipe.data, reporter, force=force,
                          splits=splits_read_by(stage, stages))
                for stage in stages if stage.input == "cache"]


def splits_read_by(stage: Stage, stages: list[Stage]) -> list[str]:
    """What a stage's cache must hold: train and val for training; test only for the last
    stage, whose frozen part and cache evaluate shares (an earlier stage's test rows would
    never be read)."""
    return ["train", "val", "test"] if stage.index == stages[-1].index else ["train", "val"]
