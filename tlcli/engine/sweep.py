"""`tl sweep`: which layers to freeze, measured. One featurize pass, then a probe and an unfreeze-from-here per boundary.

The sweep plans once (the device, the data, the base network), finds the
candidate boundaries (`model.depths`), makes one recipe per measurement
(`config.sweep`) and plans each on the same data. One pass fills every cache
the candidates train from (`engine.sweep_cache`); then each candidate is
fitted as a tl run in RUN_DIR/sweep/candidates/ID/, from its cache, and
scored on the val split; each probe is also cross-validated over train+val.
The test split is never read while choosing (`choose`). Its recipe is RUN_DIR/sweep/recommended.yaml, which a `tl fit`
trains from the same caches. A killed sweep resumes with --resume: every
finished measurement is kept (rows/ID.json), the one that was running starts over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from tlcli.config.reading import anchored, dump_recipe
from tlcli.config.schema import FreezeSpec, Recipe
from tlcli.config.sweep import Candidate, candidates, recommended_text, unfreeze_candidates
from tlcli.engine.plan import Plan, make_plan
from tlcli.engine.probe import cross_validated, cross_validation_mib
from tlcli.engine.sweep_cache import fill_caches, view_cache
from tlcli.engine.train import fit_plan
from tlcli.errors import SpecError, TLError
from tlcli.model.build import build_network
from tlcli.model.depths import checked_boundaries, default_boundaries, head_input
from tlcli.progress import Reporter
from tlcli.report.plots import plot_sweep
from tlcli.run.sweepdir import PICTURE, RECOMMENDED, TABLE, SweepDir, SweepRow


@dataclass
class SweepResult:
    sweep_dir: Path
    boundaries: list[str]
    rows: list[SweepRow]
    choice: SweepRow
    recommended: Path
    seconds: float
    skipped: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        rows = [r.model_dump(mode="json", exclude={"recipe_text"}) for r in self.rows]
        return {"sweep_dir": str(self.sweep_dir), "boundaries": self.boundaries, "rows": rows,
                "choice": self.choice.id, "recommended": str(self.recommended), "seconds": round(self.seconds, 2)}


class _Quiet(Reporter):
    """A candidate's fit: its progress shown under the candidate's name; its notes and warnings
    are about a recipe tl wrote (the user's recipe was told about when it was read)."""

    def __init__(self, outer: Reporter, name: str):
        self.outer, self.name = outer, name

    def task(self, description: str, total, unit: str = "it"):
        return self.outer.task(f"{self.name}: {description}", total, unit)


def sweep(recipe: Recipe, reporter: Reporter = Reporter(), force: bool = False, resume: bool = False) -> SweepResult:
    """`tl sweep`: plan once, measure every candidate (resuming a killed sweep), recommend one."""
    started = time.perf_counter()
    plan = make_plan(recipe)
    if plan.dist.enabled:
        raise TLError("tl sweep runs in one process; run it without torchrun")
    if not plan.data.splits.get("val"):
        raise recipe.locate(SpecError([(("data", "split", "val"), "a sweep chooses on the val split; set it > 0")]))
    graph = plan.network.graph
    with recipe.located():
        top = head_input(graph, plan.network.head_layer)
        boundaries = (checked_boundaries(graph, [*recipe.sweep.boundaries, *([] if top in recipe.sweep.boundaries else [top])])
                      if recipe.sweep.boundaries else default_boundaries(graph, plan.network.head_layer))
    where = SweepDir(recipe.output_dir)
    recipe_text = dump_recipe(anchored(recipe))
    where.check(recipe_text, force, resume, Path(recipe.source.name))
    shapes = graph.output_shapes(len(plan.network.preprocess.mean), plan.network.preprocess.size)
    maps = {b for b in boundaries if len(shapes.get(graph.resolve(b), ())) == 3}
    with where.exclusive():
        where.check_state(recipe_text, force, resume)  # again under the lock: another sweep may have finished
        where.start(recipe_text, resume)
        made = candidates(recipe, boundaries, top, maps, where.path / "candidates")
        plans = {c.id: _planned(c, plan, where) for c in made}
        # The unfreeze candidates train from the default probe's cache, then from the base's at
        # each boundary: the default's network frozen there (the same frozen weights and graph).
        default = plans[made[0].id].network
        below = [default.with_freeze(FreezeSpec(until=b)) for b in boundaries if b != top and recipe.sweep.unfreeze]
        union = plans.get("multi-depth", plans[made[0].id])
        caches = fill_caches(union, list(plans.values()), reporter, force=force, more=below)
        rows = [_measured(c, plans[c.id], caches, where, reporter) for c in made]
        later = unfreeze_candidates(recipe, boundaries, top, rows[0].l2, where.path / "candidates")
        rows += [_measured(c, _planned(c, plan, where), caches, where, reporter) for c in later]
        made += later
        choice = choose(rows, recipe.sweep.tie)
        recommended = _write_outputs(where, recipe, boundaries, rows, choice, next(c for c in made if c.id == choice.id))
        result = SweepResult(where.path, boundaries, rows, choice, recommended, time.perf_counter() - started)
        where.finish(result.as_json())
    return result


def _planned(candidate: Candidate, plan: Plan, where: SweepDir) -> Plan:
    """A candidate planned on the sweep's device and data (no second data plan, no second device)."""
    # Beside its run, not inside it: a fit refuses an output_dir that holds its own recipe file.
    path = where.write_text(f"candidates/{candidate.id}.yaml", candidate.text)
    recipe = candidate.recipe(str(path))
    network = build_network(recipe, plan.data.class_names)
    return Plan(recipe, network.stages, plan.device, plan.dist, plan.data, network, plan.precision)


def _measured(candidate: Candidate, plan: Plan, caches: dict, where: SweepDir, reporter: Reporter) -> SweepRow:
    """The candidate's row: kept from an earlier, killed sweep, or fitted now (from the start)."""
    kept = where.row(candidate.id, candidate.text)
    if kept is not None:
        reporter.info(f"{candidate.id}: kept from the interrupted sweep (val_acc {kept.val_acc:.4f})")
        return kept
    started = time.perf_counter()
    result = fit_plan(plan, _Quiet(reporter, candidate.id), force=True)
    cache = caches[view_cache(plan.network.for_stage(plan.stages[-1]), plan).key]
    cache_bytes = sum(s["bytes"] for split in cache.manifest["splits"].values() for s in split["shards"])
    l2 = result.stages[-1].l2
    cv_acc = None
    if candidate.kind != "unfreeze" and l2 is not None and len(cache.manifest["frontier"]) == 1:
        cv_acc = _cross_validated(cache, l2, plan.recipe.data.split.seed, plan.recipe.cache.memory_mib)
    row = SweepRow(id=candidate.id, kind=candidate.kind, boundary=candidate.boundary,
                   trainable_params=result.stages[-1].trainable_params, cache_bytes=cache_bytes,
                   val_acc=result.final["val_acc"], cv_acc=cv_acc, l2=l2,
                   seconds=round(time.perf_counter() - started, 3), recipe_text=candidate.text)
    where.save_row(row)
    return row


def _cross_validated(cache, l2: float, seed: int, budget_mib: int) -> Optional[float]:
    """The probe's 5-fold accuracy over the cache's train and val rows (held in memory: a probe's
    rows are, or it would not have been fitted by L-BFGS with an L2). None when the folds' logits
    would not fit cache.memory_mib (many rows times many classes): the probe is then scored on val."""
    n = cache.count("train") + cache.count("val")
    if cross_validation_mib(n, cache.manifest["frontier"][0]["shape"][0], len(cache.manifest["class_names"])) > budget_mib:
        return None
    rows = [(f[0], y) for split in ("train", "val") for f, y in cache.iterate(split)]
    x, y = torch.cat([f for f, _ in rows]), torch.cat([y for _, y in rows])
    return cross_validated(x, y, len(cache.manifest["class_names"]), l2_grid=(l2,), seed=seed)[0]


def choose(rows: list[SweepRow], tie: float) -> SweepRow:
    """The recommendation, in two steps, each comparing like with like:
    1. the probes (each boundary's and the multi-depth one) by their accuracy cross-validated over
       train+val (val accuracy where a probe has none): a val split of a few hundred images moves
       by half a point per image, and the best of a dozen val scores is mostly luck;
    2. an unfreeze-from-here replaces that probe only when it is more accurate on the same val
       images, by more than `tie`; the best of those wins.
    Within `tie` of the best, the fewest trainable parameters win (then the earliest row: the
    default probe comes first)."""
    def fewest(tied: list[SweepRow]) -> SweepRow:
        return min(tied, key=lambda r: (r.trainable_params, rows.index(r)))

    def score(r: SweepRow) -> float:
        return r.val_acc if r.cv_acc is None else r.cv_acc

    probes = [r for r in rows if r.kind != "unfreeze"]
    best = max(map(score, probes))
    probe = fewest([r for r in probes if score(r) >= best - tie - 1e-9])
    better = [r for r in rows if r.kind == "unfreeze" and r.val_acc > probe.val_acc + tie + 1e-9]
    if not better:
        return probe
    top = max(r.val_acc for r in better)
    return fewest([r for r in better if r.val_acc >= top - tie - 1e-9])


def table(rows: list[SweepRow], choice: SweepRow) -> str:
    """The rows as a fixed-width table, the choice marked."""
    head = (f"  {'measurement':<11} {'boundary':<28} {'trainable':>11} {'cache MB':>9} {'val acc':>8} {'cv acc':>7} "
            f"{'seconds':>8}")
    lines = [head]
    for r in rows:
        boundary = r.boundary if len(r.boundary) <= 28 else r.boundary[:25] + "..."
        mark = "*" if r.id == choice.id else " "
        cv = "" if r.cv_acc is None else f"{r.cv_acc:.4f}"
        lines.append(f"{mark} {r.kind:<11} {boundary:<28} {r.trainable_params:>11,} {r.cache_bytes / 2**20:>9.1f} "
                     f"{r.val_acc:>8.4f} {cv:>7} {r.seconds:>8.1f}")
    return "\n".join(lines)


def _write_outputs(where: SweepDir, recipe: Recipe, boundaries: list[str], rows: list[SweepRow], choice: SweepRow,
                   winner: Candidate) -> Path:
    text = table(rows, choice)
    where.write_text(TABLE, text + "\n")
    plot_sweep([r.model_dump() for r in rows], boundaries, choice.id, where / PICTURE)
    note = (f"Recommended by tl sweep {Path(recipe.source.name).name}: {choice.kind} at {choice.boundary}, "
            f"val accuracy {choice.val_acc:.4f}{'' if choice.cv_acc is None else f', cross-validated {choice.cv_acc:.4f}'}\n"
            f"({choice.trainable_params:,} trainable parameters). The sweep's table: {where / TABLE}\n"
            f"tl fit {where / RECOMMENDED} reuses the sweep's feature caches.")
    return where.write_text(RECOMMENDED, recommended_text(recipe, winner, where.recommended_run, note))

