"""Featurize: run a stage's frozen part once per split and write its frontier tensors into the cache.

A cache is built in a private `<key>.tmp-<pid>` directory (shards written
atomically, the manifest last) and renamed into place, so a killed run never
leaves a directory that looks complete (`engine.cache` owns the layout). The
key hashes everything that determines the features; nothing keyed on mtimes.
Under torchrun every rank writes its units of each split; rank 0 writes the
manifest once all are done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from tlcli.config.schema import CacheSpec, DataSpec, Recipe
from tlcli.config.stages import Stage
from tlcli.data.pipeline import ImageLoader, decode_threads, jpeg_decoder
from tlcli.data.sources import DataPlan, require_every_class
from tlcli.engine import distributed
from tlcli.engine.device import to_channels_last
from tlcli.engine.cache import (CACHE_FORMAT, FeatureCache, ShardWriter, build_lock, cache_key, merged_manifest, open_cache,
                                publish, split_units)
from tlcli.engine.plan import Plan, make_plan
from tlcli.engine.precision import Precision
from tlcli.errors import out_of_memory
from tlcli.files import file_lock
from tlcli.model.network import Network
from tlcli.progress import Reporter


def key_components(view: Network, data: DataPlan, extractor: torch.fx.GraphModule, dtype: str, *, precision: str,
                   decoder: str = "libjpeg-turbo", splits: Optional[Sequence[str]] = None, compiled: bool = False) -> dict:
    """Everything that determines the cached features of `view`'s frozen part (`extractor`), one
    hash or value each; `splits`: which of the data's splits the cache holds (all by default)."""
    return _components(data.identity(decoder), view.frozen_identity(extractor), dtype, precision,
                       splits or list(data.splits), compiled)


def _components(data_identity: dict, frozen_identity: dict, dtype: str, precision: str, splits: Sequence[str],
                compiled: bool = False) -> dict:
    # precision: what computed the rows; dtype: how they are stored. A head trained on bf16
    # features is evaluated on bf16 features: neither may hit the other's cache. A compiled
    # forward fuses differently (features within 1e-4): its own cache too; named only
    # when on, so that every cache written before the option keeps its key.
    return {"format": CACHE_FORMAT, **frozen_identity, **data_identity, "dtype": dtype, "precision": precision,
            "splits": sorted(splits), **({"compile": True} if compiled else {})}


class _Extractor:
    """The frozen part on the device, in channels_last, computing at the plan's precision and
    storing at the cache's dtype."""

    def __init__(self, module: torch.fx.GraphModule, device: torch.device, precision: Precision, dtype: str,
                 compiled: bool = False, batch: int = 0):
        self.device = device
        self.module = to_channels_last(module.to(device).eval(), device)
        self.precision = precision
        self.store_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        # Compiled for one batch size: a short last batch is padded to it (in eval mode each row's
        # features depend on that row alone), since a second shape would compile it all again.
        self.compiled = None
        if compiled:
            # Inductor's C++ build says "No CUDA runtime is found, using CUDA_HOME" on every CPU
            # machine with a CUDA build of torch: noise between tl's lines, not a problem.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            self.compiled = torch.compile(self.module, dynamic=False)
        self.batch = batch

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: a normalised batch on the device (the pipeline's output). The outputs on the CPU."""
        return self.start(x).result()

    def start(self, x: torch.Tensor) -> "_Outputs":
        """The forward of `x` enqueued and its outputs on their way to the CPU: on CUDA into
        pinned buffers by non-blocking copies, so the caller can write the batch before while
        this one computes (a blocking copy into pageable memory stalls the stream each batch)."""
        with self.precision.autocast(self.device):
            outs = self._forward(x)
        if self.device.type != "cuda":
            return _Outputs([o.to("cpu", self.store_dtype).contiguous() for o in outs], None)
        host = []
        for o in outs:
            o = o.to(self.store_dtype).contiguous()
            host.append(torch.empty(o.shape, dtype=o.dtype, pin_memory=True).copy_(o, non_blocking=True))
        done = torch.cuda.Event()
        done.record()
        return _Outputs(host, done)

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.compiled is None:
            return list(self.module(x))
        n = len(x)
        if n < self.batch:
            x = torch.cat([x, x.new_zeros((self.batch - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        return [o[:n] for o in self.compiled(x)] if n < self.batch else list(self.compiled(x))


class _Outputs:
    """A batch's features on the CPU once `done` (a CUDA event; None: already there) has passed."""

    def __init__(self, tensors: list[torch.Tensor], done):
        self.tensors, self.done = tensors, done

    def result(self) -> list[torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.tensors


def featurize(view: Network, data: DataPlan, device: torch.device, cache: CacheSpec, spec: DataSpec,
              reporter: Reporter = Reporter(), force: bool = False, splits: Optional[Sequence[str]] = None, *,
              precision: Precision) -> FeatureCache:
    """The cache of `view`'s frozen part on `data` (its `splits`, all by default), computed at
    `precision`, built when missing (or forced); `spec` says how to read the images (batch,
    threads, bad images)."""
    splits = [s for s in data.splits if splits is None or s in splits]
    data_identity = data.identity(jpeg_decoder(device))
    extractor = view.extractor()
    identity = view.frozen_identity(extractor)
    components = _components(data_identity, identity, cache.dtype, precision.name, splits, cache.compile)
    key = cache_key(components)
    final = Path(cache.dir) / key
    whole = Path(cache.dir) / cache_key(_components(data_identity, identity, cache.dtype, precision.name, list(data.splits),
                                                    cache.compile))
    if whole != final and not force and open_cache(whole) is not None:
        # A cache of every split (a sweep's, or a one-stage run's) holds the rows this one needs.
        if distributed.current().main:
            reporter.info(f"feature cache hit: {whole}")
        return _opened(whole, data)
    dist = distributed.current()
    # One builder per key: a second featurizer waits here, then finds the cache complete.
    # Under torchrun, rank 0 decides and owns the directory; every rank writes its units.
    with file_lock(build_lock(final)) if dist.main else contextlib.nullcontext():
        tmp = distributed.broadcast(_start_build(final, key, force) if dist.main else None, "starting the cache")
        if tmp is not None:
            _build(view, data, splits, (extractor, device, precision), Path(tmp), final, cache, spec,
                   {**components, "key": key}, reporter)
    distributed.barrier("waiting for the cache to be in place")
    if dist.main:
        reporter.info(f"feature cache {'hit' if tmp is None else 'written'}: {final}")
    return _opened(final, data)


def _build(view: Network, data: DataPlan, splits: list[str], frozen: tuple, tmp: Path, final: Path,
           cache: CacheSpec, spec: DataSpec, keyed: dict, reporter: Reporter) -> None:
    """Every rank's shards into `tmp`; then rank 0 writes the manifest (last) and swaps it in.
    `frozen`: the frozen part, the device and the precision it runs at."""
    dist = distributed.current()
    extract = _Extractor(*frozen, cache.dtype, compiled=cache.compile, batch=spec.batch_size)
    if cache.compile and dist.main:
        reporter.info(f"cache.compile: the frozen part is compiled by torch.compile for batch {spec.batch_size}; "
                      "the first batch waits for it (about a minute on a CPU)")
    try:
        with out_of_memory(f"featurizing (batch {spec.batch_size})", "lower data.batch_size"):
            part = _write_splits(view, data, splits, extract, tmp, cache, spec, reporter)
        if dist.enabled:
            reporter.info(f"{dist}: {sum(s['rows'] for shards in part['splits'].values() for s in shards)} rows")
        parts = distributed.gather(part, "gathering the cache's shards")
        if dist.main:
            position = {str(source): i for split in splits for i, (source, _) in enumerate(data.splits[split])}
            components = {k: v for k, v in keyed.items() if k != "key"}
            manifest = {**merged_manifest(parts, data.class_names, splits, position), "key": keyed["key"],
                        "components": components}
            publish(tmp, final, manifest, reporter.info)
    except BaseException:
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)  # a kill -9 skips this; the next run removes it (pid gone)
        raise


def _start_build(final: Path, key: str, force: bool) -> Optional[str]:
    """None when a complete cache is there (and not forced); else a fresh build directory."""
    if open_cache(final) is not None and not force:
        return None
    _remove_dead_partials(final)
    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return str(tmp)


def _opened(final: Path, data: DataPlan) -> FeatureCache:
    written = open_cache(final)
    assert written is not None, "a cache just written (or found complete) must open"
    _check_rows(written, data)
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


def _write_splits(view: Network, data: DataPlan, splits: list[str], extract: "_Extractor", tmp: Path,
                  cache: CacheSpec, spec: DataSpec, reporter: Reporter) -> dict:
    """This rank's units of every split through the frozen part into shards: its part of the manifest."""
    dist = distributed.current()
    part: dict = {"frontier": [], "splits": {}, "skipped": []}
    dtype_name = str(extract.store_dtype).removeprefix("torch.")
    started = time.perf_counter()
    for split_name in splits:
        pairs = data.splits[split_name]
        unit_batches, n_units = split_units(len(pairs), spec.batch_size, cache.shard_size)
        rows_per_unit = unit_batches * spec.batch_size
        mine = list(range(dist.rank, n_units, dist.world))
        my_pairs = [p for u in mine for p in pairs[u * rows_per_unit : (u + 1) * rows_per_unit]]
        batches = ImageLoader(my_pairs, view.preprocess, spec.batch_size, extract.device,
                              decode_threads(spec.num_workers, extract.device), on_bad_image=spec.on_bad_image)
        writer = ShardWriter(tmp, split_name, unit_batches, mine)
        with reporter.task(f"featurize {split_name}", total=len(my_pairs), unit="img") as task, torch.inference_mode():
            def write(pending) -> None:
                outs, y, chunk = pending[0].result(), pending[1], pending[2]
                if not part["frontier"]:
                    part["frontier"] = [{"name": n, "shape": list(o.shape[1:]), "dtype": dtype_name}
                                        for n, o in zip(view.split.frontier_names, outs)]
                writer.add(outs, y, chunk)
                task.advance(len(y))

            # Batch k is written while batch k+1 computes (on CUDA; on the CPU each result is
            # there when start returns, and the order of the writes is the same).
            pending = None
            for x, y in batches:
                started_batch = (extract.start(x), y, batches.chunk)
                if pending is not None:
                    write(pending)
                pending = started_batch
            if pending is not None:
                write(pending)
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
    """`tl featurize`: plan once, then build the cache of every stage that trains from one."""
    return featurize_plan(make_plan(recipe), reporter, force)


def featurize_plan(plan: Plan, reporter: Reporter = Reporter(), force: bool = False) -> list[FeatureCache]:
    if plan.dist.main and plan.recipe.precision != "fp32":  # auto or bf16: which, and why, on this machine
        reporter.info(f"precision: {plan.precision.reason}")
    with plan.recipe.located():
        caches = [featurize(plan.network.for_stage(stage), plan.data, plan.device, plan.recipe.cache, plan.recipe.data,
                            reporter, force=force, splits=splits_read_by(stage, plan.stages), precision=plan.precision)
                  for stage in plan.stages if stage.input == "cache"]
    plan.report_hints(reporter)  # after the work: what to try next time
    plan.precision_hint(reporter)
    return caches


def splits_read_by(stage: Stage, stages: list[Stage]) -> list[str]:
    """What a stage's cache must hold: train and val for training; test only for the last
    stage, whose frozen part and cache evaluate shares (an earlier stage's test rows would
    never be read)."""
    return ["train", "val", "test"] if stage.index == stages[-1].index else ["train", "val"]
