"""The recipes a sweep fits, one per measurement, each made from the user's recipe. Imports no torch.

For a boundary B (a node the model computes) and the head's input H:

- `probe@H` is the user's recipe frozen below its head: the default, a linear probe;
- `probe@B` cuts the network at B: the surgery pools B's map (adaptive average),
  flattens it and adds a Linear head there (`sweep_head`), frozen below the head;
- `multi-depth` concatenates every pooled B and H under one Linear head (Head2Toe);
- `unfreeze@B` is LP-FT in two stages: the probe head at H (as `probe@H` fits it), then
  everything above B trained from the cache at B for `sweep.epochs`, with the recipe's
  fine_tune and `sweep.fine_tune` over it (default: adam at lr 1e-4, BN statistics kept).

Every candidate is a complete recipe: the winner, with its own output_dir (and the
user's `tracking`, which the candidates' fits do not log to), is the recommendation.
The user's `augment`, `stages` and `sweep` are not carried over: a sweep measures
from the cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import yaml

from tlcli.config.reading import anchored, dump_recipe, parse_recipe
from tlcli.config.schema import Recipe
from tlcli.config.training import SWEEP_UNFREEZE_DEFAULTS

HEAD = "sweep_head"
CONCAT = "sweep_concat"


@dataclass(frozen=True)
class Candidate:
    id: str  # its directory under sweep/candidates/
    kind: str  # probe, multi-depth, unfreeze
    boundary: str  # where its trained part starts (multi-depth: every boundary)
    text: str  # the recipe, as YAML

    def recipe(self, name: str) -> Recipe:
        return parse_recipe(self.text, name)


def _flat(boundary: str) -> str:
    return "sweep_flat_" + re.sub(r"\W", "_", boundary)


def _pooled(boundary: str) -> list[dict]:
    """Surgery that pools and flattens a feature map at `boundary`."""
    name = re.sub(r"\W", "_", boundary)
    return [{"add": {"name": f"sweep_pool_{name}", "type": "pooling", "pool": "adaptive_avg", "inputs": [boundary]}},
            {"add": {"name": _flat(boundary), "type": "flatten", "inputs": [f"sweep_pool_{name}"]}}]


def _as_text(data: dict) -> str:
    """A recipe mapping as YAML, its sections in the reference's order."""
    return yaml.safe_dump({key: data[key] for key in Recipe.model_fields if key in data}, sort_keys=False)


def _new_head(inputs: str) -> list[dict]:
    return [{"add": {"name": HEAD, "type": "linear", "inputs": [inputs]}}, {"outputs": [HEAD]}]


def as_written(recipe: Recipe) -> dict:
    """The recipe as its user wrote it (overrides applied), every path made absolute and the
    cache's directory always named: a candidate reads like its user's recipe, and finds the
    sweep's caches from any directory."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    full = yaml.safe_load(dump_recipe(anchored(recipe)))
    for section, key in (("data", "imagefolder"), ("data", "csv"), ("data", "jsonl"), ("data", "root"),
                         ("base", "checkpoint")):
        if data.get(section, {}).get(key) is not None:
            data[section][key] = full[section][key]
    weights = data.get("base", {}).get("weights")
    if isinstance(weights, dict) and weights.get("file") is not None:
        weights["file"] = full["base"]["weights"]["file"]
    data["cache"] = {**data.get("cache", {}), "dir": full["cache"]["dir"]}
    return data


def _common(recipe: Recipe) -> dict:
    """What every candidate keeps of the user's recipe."""
    return {k: v for k, v in as_written(recipe).items() if k not in ("sweep", "stages", "augment", "tracking")}


def candidates(recipe: Recipe, boundaries: list[str], head_input: str, maps: set[str], output_dir: Path) -> list[Candidate]:
    """Every measurement's recipe. `boundaries` in execution order, `head_input` last among them;
    `maps`: the boundaries whose output is a (C, H, W) map (pooled for a probe); any other
    boundary but the head's input has no probe of its own (a token sequence is not pooled)."""
    base = _common(recipe)
    surgery, head = base.get("surgery", []), base.get("head", {})

    def make(cid: str, kind: str, boundary: str, **changes) -> Candidate:
        return Candidate(cid, kind, boundary, _as_text({**base, **changes, "output_dir": str(output_dir / cid)}))

    out = [make(f"probe-{head_input}", "probe", head_input, freeze={"until": head_input})]
    below = [b for b in boundaries if b != head_input]
    for b in below:
        if b in maps:
            out.append(make(f"probe-{b}", "probe", b, surgery=[*surgery, *_pooled(b), *_new_head(_flat(b))],
                            freeze={"until": _flat(b)}, head={**head, "layer": HEAD}))
    pooled = [b for b in below if b in maps]
    if pooled:
        merge = [{"add": {"name": CONCAT, "type": "concat", "inputs": [*map(_flat, pooled), head_input]}}]
        out.append(make("multi-depth", "multi-depth", "+".join([*pooled, head_input]),
                        surgery=[*surgery, *(op for b in pooled for op in _pooled(b)), *merge, *_new_head(CONCAT)],
                        freeze={"until": CONCAT}, head={**head, "layer": HEAD}))
    return out


def unfreeze_candidates(recipe: Recipe, boundaries: list[str], head_input: str, head_l2: Optional[float],
                        output_dir: Path) -> list[Candidate]:
    """LP-FT at each boundary below the head's input, the deepest (the cheapest) first. The head
    stage fits the probe with `head_l2`, the L2 the probe at the head's input chose on val: the
    same head that probe fitted, without choosing again."""
    if not recipe.sweep.unfreeze:
        return []
    base = _common(recipe)
    tuned = {**SWEEP_UNFREEZE_DEFAULTS,
             **(recipe.sweep.fine_tune.model_dump(exclude_none=True) if recipe.sweep.fine_tune else {})}
    head = {"name": "head", **({"fine_tune": {"weight_decay": head_l2}} if head_l2 else {})}
    out = []
    for b in reversed([b for b in boundaries if b != head_input]):
        cid = f"unfreeze-{b}"
        stages = [head, {"name": "unfreeze", "freeze": {"until": b}, "input": "cache", "epochs": recipe.sweep.epochs,
                         "fine_tune": tuned}]
        data = {**base, "freeze": {"until": head_input}, "stages": stages, "output_dir": str(output_dir / cid)}
        out.append(Candidate(cid, "unfreeze", b, _as_text(data)))
    return out


def recommended_text(recipe: Recipe, candidate: Candidate, output_dir: Path, note: str) -> str:
    """The winner's recipe, training into `output_dir` and logging where the user's recipe logs,
    with a comment saying where it came from."""
    data = {**yaml.safe_load(candidate.text), "output_dir": str(output_dir)}
    tracking = as_written(recipe).get("tracking")
    if tracking is not None:
        data["tracking"] = tracking
    return "".join(f"# {line}\n" for line in note.splitlines()) + _as_text(data)
