"""Featurize for a sweep: one pass over the data fills the cache of every stage, of every candidate, that trains from one.

Each candidate's cache is keyed exactly as `tl fit` of that candidate keys it
(its own network's frozen identity, every split), so the candidates' fits, and
a later fit of the recommended recipe, find their caches complete. The pass
runs one frozen graph, the union of all the frozen parts: the network of the
candidate whose graph holds every frontier (the multi-depth probe's holds the
base's nodes and every pooled branch), cut at all of them. Its outputs are the
same computations, on the same modules' weights, as each candidate's own
extractor; `tests/test_sweep.py` checks the bits. A frontier the union does not
hold is featurized alone, by `tl featurize`'s own code.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tlcli.engine.cache import FeatureCache, ShardWriter, build_lock, cache_key, merged_manifest, open_cache, publish, split_units
from tlcli.engine.features import _components, _Extractor, _start_build, featurize
from tlcli.engine.plan import Plan
from tlcli.data.pipeline import ImageLoader, decode_threads, jpeg_decoder
from tlcli.errors import out_of_memory
from tlcli.files import file_lock
from tlcli.model.graph import Split, frozen_extractor, split_at
from tlcli.model.network import Network
from tlcli.progress import Reporter

import torch


@dataclass
class Wanted:
    """A cache some candidate's stage trains from."""

    key: str
    components: dict
    frontier: list[str]  # its frontier's node names, in order
    view: Network  # the candidate's network under that stage's split


def view_cache(view: Network, plan: Plan) -> Wanted:
    """The cache `view`'s frozen part fills on `plan`'s data, keyed with every split: the key
    `tl fit` of a recipe frozen there finds."""
    components = _components(plan.data.identity(jpeg_decoder(plan.device)), view.frozen_identity(view.extractor()),
                             plan.recipe.cache.dtype, plan.precision.name, list(plan.data.splits), plan.recipe.cache.compile)
    return Wanted(cache_key(components), components, view.split.frontier_names, view)


def wanted_caches(plans: list[Plan], more: list[Network] = ()) -> dict[str, Wanted]:
    """Every distinct cache the plans' cache stages read, and those of the `more` views."""
    wanted: dict[str, Wanted] = {}
    for plan in plans:
        for view in [*(plan.network.for_stage(s) for s in plan.stages if s.input == "cache"), *more]:
            w = view_cache(view, plan)
            wanted.setdefault(w.key, w)
    return wanted


def fill_caches(union: Plan, plans: list[Plan], reporter: Reporter, force: bool = False,
                more: list[Network] = ()) -> dict[str, FeatureCache]:
    """Every candidate's cache, and those of the `more` views (of the first plan's network), built
    when missing (all forced with `force`) in one pass of `union`'s network; the complete caches by key."""
    cache_dir = Path(union.recipe.cache.dir)
    wanted = {**wanted_caches(plans), **wanted_caches(plans[:1], more)}
    graph = union.network.graph
    alone = [w for w in wanted.values() if any(name not in graph.by_name for name in w.frontier)]
    together = {k: w for k, w in wanted.items() if w not in alone}
    with contextlib.ExitStack() as locks:
        for key in sorted(together):
            locks.enter_context(file_lock(build_lock(cache_dir / key)))
        # Under the locks: a cache another process finished meanwhile is not built again.
        tmps = {key: Path(t) for key in sorted(together) if (t := _start_build(cache_dir / key, key, force)) is not None}
        if tmps:
            with out_of_memory(f"featurizing (batch {union.recipe.data.batch_size})", "lower data.batch_size"):
                _one_pass(union, [together[k] for k in tmps], tmps, reporter)
    for w in alone:  # not in the union's graph: its own pass, as tl featurize makes it
        featurize(w.view, union.data, union.device, union.recipe.cache, union.recipe.data, reporter, force=force,
                  precision=union.precision)
    return {key: open_cache(cache_dir / key) for key in wanted}


def _one_pass(union: Plan, wanted: list[Wanted], tmps: dict[str, Path], reporter: Reporter) -> None:
    graph = union.network.graph
    names = list(dict.fromkeys(name for w in wanted for name in w.frontier))
    targets = [graph.by_name[name] for name in names]
    frozen = split_at(graph, targets).frozen
    extract = _Extractor(frozen_extractor(Split(graph, frozen, targets)), union.device, union.precision,
                         union.recipe.cache.dtype, compiled=union.recipe.cache.compile, batch=union.recipe.data.batch_size)
    spec, cache = union.recipe.data, union.recipe.cache
    parts = {w.key: {"frontier": [], "splits": {}, "skipped": []} for w in wanted}
    started = time.perf_counter()
    try:
        for split_name, pairs in union.data.splits.items():
            unit_batches, n_units = split_units(len(pairs), spec.batch_size, cache.shard_size)
            writers = {w.key: ShardWriter(tmps[w.key], split_name, unit_batches, list(range(n_units))) for w in wanted}
            batches = ImageLoader(pairs, union.network.preprocess, spec.batch_size, extract.device,
                                  decode_threads(spec.num_workers, extract.device), on_bad_image=spec.on_bad_image)
            with reporter.task(f"featurize {split_name} ({len(wanted)} caches)", total=len(pairs), unit="img") as task, \
                    torch.inference_mode():
                for x, y in batches:
                    outs = dict(zip(names, extract(x)))
                    for w in wanted:
                        mine = [outs[name] for name in w.frontier]
                        if not parts[w.key]["frontier"]:
                            parts[w.key]["frontier"] = [{"name": n, "shape": list(o.shape[1:]),
                                                         "dtype": str(extract.store_dtype).removeprefix("torch.")}
                                                        for n, o in zip(w.frontier, mine)]
                        writers[w.key].add(mine, y, batches.chunk)
                    task.advance(len(y))
            for w in wanted:
                parts[w.key]["splits"][split_name] = writers[w.key].summary()
                parts[w.key]["skipped"] = list(dict.fromkeys([*parts[w.key]["skipped"], *batches.skipped]))
        seconds = round(time.perf_counter() - started, 3)
        position = {str(source): i for pairs in union.data.splits.values() for i, (source, _) in enumerate(pairs)}
        for w in wanted:
            part = {**parts[w.key], "seconds": seconds}
            manifest = {**merged_manifest([part], union.data.class_names, list(union.data.splits), position),
                        "key": w.key, "components": w.components}
            publish(tmps[w.key], tmps[w.key].parent / w.key, manifest, reporter.info)
    finally:
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)  # published ones were renamed away already
