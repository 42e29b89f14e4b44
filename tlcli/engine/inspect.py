"""Inspect and validate: check every name in a recipe, and list the model's nodes for choosing a boundary.

Nodes come in execution order, after the recipe's surgery, with output
shapes from a one-image dry run. Neither command reads weights or data."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from tlcli.config.reading import load_recipe
from tlcli.config.schema import Recipe
from tlcli.data.sources import class_names_for
from tlcli.engine.device import resolve_device
from tlcli.errors import TLError
from tlcli.model.build import build_network
from tlcli.model.graph import format_shape
from tlcli.run.tracking import require_trackers


def validate_recipe(recipe: Union[Recipe, Path]) -> None:
    """Schema, then every name in every operation and stage against the model's
    graph. The architecture is built without pretrained weights or data."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with recipe.located():
        resolve_device(recipe.device)
        require_trackers(recipe)
        names = class_names_for(recipe.data)
    build_network(recipe, names, weights=False)


def inspect_recipe(recipe: Union[Recipe, Path], stage: int | None = None) -> tuple[list[dict], dict]:
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    with recipe.located():
        names = class_names_for(recipe.data)
    network = build_network(recipe, names, weights=False)
    stages = network.stages
    if stage is not None and not 1 <= stage <= len(stages):
        raise TLError(f"{recipe.source.name}: --stage {stage}: the recipe has {len(stages)} stage(s)")
    chosen = stages[(stage or 1) - 1]
    network = network.for_stage(chosen)
    graph, split = network.graph, network.split
    shapes = graph.output_shapes(network.preprocess.channels, network.preprocess.size)
    frontier = set(split.frontier)
    rows = []
    for i, (node, name) in enumerate(graph.names.items()):
        if node.op == "placeholder":
            continue
        shape = format_shape(shapes[node]) if node in shapes else ""
        rows.append({
            "index": i,
            "name": name,
            "op": type(graph.module_of(node)).__name__ if node.op == "call_module" else getattr(node.target, "__name__", str(node.target)),
            "shape": shape,
            "params": graph.param_count(node),
            "frozen": node in split.frozen or node in split.pinned,
            "added": graph.module_of(node) is not None and node.target in network.added,
            "frontier": node in frontier,
        })
    frozen_names = set(split.frozen_state_names(network.model))
    params = dict(network.model.named_parameters())
    summary = {
        "title": f"{recipe.base.describe()}  head {network.head_layer} -> {network.num_classes} classes"
        + (f"  [{chosen.name}: {chosen.input}]" if len(stages) > 1 else ""),
        "frozen_params": sum(p.numel() for n, p in params.items() if n in frozen_names),
        "trainable_params": sum(p.numel() for n, p in params.items() if n not in frozen_names),
        "frontier": split.frontier_names,
    }
    return rows, summary
