"""The feature cache on disk: its layout, its manifest's schema, writing shards, and reading rows back checked.

    <cache.dir>/<key>/manifest.json          written last: its presence marks the cache complete
    <cache.dir>/<key>/<split>-NNNNN.safetensors  one shard per unit of whole batches
    <cache.dir>/locks/<key>.build, <key>.read    one builder per key; fits reading it

The manifest is parsed with bounds (names stay inside the cache, counts add
up, the key is its components'), and every shard is checked as it is read:
its size and blake2b digest against the manifest, then its shapes and labels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load

from tlcli.errors import DataError
from tlcli.files import atomic_write, file_lock, fsync_directory, tensors_bytes, write_json_atomic

# 2: images are resized in uint8 by the pipeline (rounding differs from format 1's float resize).
# 3: the manifest records each shard's digest, checked whenever the shard is read.
# 4: the built-in digits are rendered white on black, in uint8, as a PNG of them holds them.
CACHE_FORMAT = 4
MANIFEST = "manifest.json"

Batches = Iterator[tuple[list[torch.Tensor], torch.Tensor]]


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


def merged_manifest(parts: list[dict], class_names: list[str], splits: list[str], position: dict[str, int]) -> dict:
    """Every rank's part (its shards, skips and seconds), merged into the manifest one process
    writes: shards in unit order, skipped files in data order (`position` of each path)."""
    frontier = next((p["frontier"] for p in parts if p["frontier"]), [])
    manifest = {"format": CACHE_FORMAT, "frontier": frontier, "class_names": class_names, "splits": {}}
    for split in splits:
        shards = sorted((s for p in parts for s in p["splits"][split]), key=lambda s: s["unit"])
        manifest["splits"][split] = {"count": sum(s["rows"] for s in shards),
                                     "shards": [{k: v for k, v in s.items() if k != "unit"} for s in shards]}
    skipped = sorted({path for p in parts for path in p["skipped"]}, key=lambda path: position.get(path, -1))
    if skipped:
        manifest["skipped"] = skipped
    manifest["seconds"] = max(p["seconds"] for p in parts)
    return manifest


def build_lock(final: Path) -> Path:
    """Held by the one process building a cache key; a second builder waits on it."""
    return final.parent / "locks" / f"{final.name}.build"


def read_lock(final: Path) -> Path:
    """Held shared by every fit that reads the cache; a rebuild swaps only when none does."""
    return final.parent / "locks" / f"{final.name}.read"


def publish(tmp: Path, final: Path, manifest: dict, say) -> None:
    """Make the finished build in `tmp` the cache at `final`: the manifest written last (its
    presence marks the cache complete), then `tmp` renamed into place, never under a fit that
    holds the old cache open (`say` tells the user it waits)."""
    write_json_atomic(tmp / MANIFEST, manifest, commit=True)
    with file_lock(read_lock(final), wait=False) as free:
        if not free:
            say(f"waiting for the fits reading {final} to finish before replacing it")
    with file_lock(read_lock(final)):
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.replace(final, old)  # stale, damaged, or --force: out of the way in one rename
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_directory(final.parent)  # the rename into place is what publishes the cache


class CacheRows:
    """One split of the cache: read a shard at a time from disk, or held on the device
    when it fits the memory budget. Either way a generator draws the same shard order
    and row order, so both give the same batches, and the same metrics."""

    def __init__(self, cache: FeatureCache, split: str, device: Optional[torch.device] = None):
        self.cache, self.split = cache, split
        self.names, self.rows = cache.shards(split), cache.shard_rows(split)
        self.offsets = [sum(self.rows[:i]) for i in range(len(self.rows))]
        self.memory: Optional[tuple[list[torch.Tensor], torch.Tensor]] = None
        self._labels: Optional[list[torch.Tensor]] = None
        if device is not None and self.names:
            parts = [cache.read_shard(name) for name in self.names]
            frontier = [torch.cat([p[0][i] for p in parts]).to(device) for i in range(len(parts[0][0]))]
            self.memory = (frontier, torch.cat([p[1] for p in parts]).to(device))

    def labels(self) -> list[torch.Tensor]:
        """Each shard's labels (read once from disk when the rows are not held in memory)."""
        if self.memory is not None:
            return [self.memory[1][o : o + n].cpu() for o, n in zip(self.offsets, self.rows)]
        if self._labels is None:
            self._labels = [self.cache.read_shard(name)[1] for name in self.names]
        return self._labels

    def balanced_batches(self, batch_size: int, generator: torch.Generator) -> Batches:
        """As many rows as the split holds, drawn with replacement so that every class is
        equally likely (`data.sampler: balanced`). The draws are grouped by shard (shards in
        a random order), so one shard is in memory at a time, and cut into batches across
        shard boundaries: ceil(rows / batch_size) batches (what CacheBatches.steps counts)."""
        labels = torch.cat(self.labels())
        drawn = torch.multinomial(class_balanced(labels), len(labels), replacement=True, generator=generator)
        shard_of = torch.bucketize(drawn, torch.tensor(self.offsets[1:]), right=True)
        pending: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        waiting = 0
        for i in torch.randperm(len(self.names), generator=generator).tolist():
            local = drawn[shard_of == i] - self.offsets[i]
            if not len(local):
                continue
            if self.memory is not None:
                frontier, shard_labels = self.memory
                local = local + self.offsets[i]
            else:
                frontier, shard_labels = self.cache.read_shard(self.names[i])
            local = local.to(shard_labels.device)
            pending.append(([f.index_select(0, local) for f in frontier], shard_labels.index_select(0, local)))
            waiting += len(local)
            while waiting >= batch_size:
                batch, pending, waiting = _take(pending, batch_size)
                yield batch
        if waiting:
            yield _take(pending, waiting)[0]

    def batches(self, batch_size: int, generator: Optional[torch.Generator]) -> Batches:
        order = torch.randperm(len(self.names), generator=generator).tolist() if generator else range(len(self.names))
        for i in order:
            if self.memory is not None:
                frontier, labels = self.memory
                base = self.offsets[i]
            else:
                frontier, labels = self.cache.read_shard(self.names[i])
                base = 0
            rows = torch.randperm(self.rows[i], generator=generator) if generator else torch.arange(self.rows[i])
            rows = (rows + base).to(labels.device)
            for start in range(0, len(rows), batch_size):
                idx = rows[start : start + batch_size]
                # index_select, not f[idx]: the same rows, 3x faster on one thread (a head epoch's
                # 90 batches of 64 x 1280 floats: 2.1 ms against 6.3).
                yield [f.index_select(0, idx) for f in frontier], labels.index_select(0, idx)


def class_balanced(labels: torch.Tensor) -> torch.Tensor:
    """Per-row sampling weights that make every class present equally likely: 1 / its count."""
    counts = torch.bincount(labels)
    return 1.0 / counts[labels].double()


def _take(pending: list, n: int) -> tuple:
    """The first n rows of the pending pieces as one batch; the rest stay pending."""
    frontiers, labels, taken, rest = [], [], 0, []
    for frontier, piece_labels in pending:
        room = n - taken
        if room <= 0:
            rest.append((frontier, piece_labels))
            continue
        head = min(room, len(piece_labels))
        frontiers.append([f[:head] for f in frontier])
        labels.append(piece_labels[:head])
        taken += head
        if head < len(piece_labels):
            rest.append(([f[head:] for f in frontier], piece_labels[head:]))
    batch = ([torch.cat([f[j] for f in frontiers]) for j in range(len(frontiers[0]))], torch.cat(labels))
    return batch, rest, sum(len(p[1]) for p in rest)


def cached_batches(cache: FeatureCache, split: str, batch_size: int, generator: torch.Generator | None) -> Batches:
    """Mini-batches from the cache, one shard in memory at a time (shuffled when a generator is given)."""
    return CacheRows(cache, split).batches(batch_size, generator)


def fits_in_memory(cache: FeatureCache, budget_mib: int) -> bool:
    """Whether the train and val rows, as float32, fit in `cache.memory_mib`."""
    row_bytes = sum(4 * math.prod(f["shape"]) for f in cache.manifest["frontier"])
    rows = cache.count("train") + cache.count("val")
    return rows * row_bytes <= budget_mib * 2**20
