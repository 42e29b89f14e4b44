"""Inspect: the model's nodes in execution order, after the recipe's surgery,
with output shapes from a one-image dry run, so a user can choose a boundary."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.fx.passes.shape_prop import ShapeProp

from tlcli.data import plan_data
from tlcli.recipe import load_recipe
from tlcli.surgery import prepare


def inspect_recipe(path: Path) -> tuple[list[dict], dict]:
    recipe = load_recipe(path)
    plan = plan_data(recipe)
    prepared = prepare(recipe, len(plan.class_names))
    graph, split = prepared.graph, prepared.split
    size = prepared.preprocess.size
    with torch.no_grad():
        ShapeProp(graph.module.eval()).propagate(torch.zeros(1, 3, size, size))
    frontier = set(split.frontier)
    rows = []
    for i, (node, name) in enumerate(graph.names.items()):
        if node.op == "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        shape = "×".join(str(d) for d in meta.shape[1:]) if hasattr(meta, "shape") else ""
        rows.append({
            "index": i,
            "name": name,
            "op": type(graph.module_of(node)).__name__ if node.op == "call_module" else getattr(node.target, "__name__", str(node.target)),
            "shape": shape,
            "params": graph.param_count(node),
            "frozen": node in split.frozen,
            "frontier": node in frontier,
        })
    frozen_names = set(split.frozen_state_names(prepared.model))
    params = dict(prepared.model.named_parameters())
    summary = {
        "title": f"{recipe.base.zoo}:{recipe.base.model}  head {prepared.head_layer} -> {prepared.num_classes} classes",
        "frozen_params": sum(p.numel() for n, p in params.items() if n in frozen_names),
        "trainable_params": sum(p.numel() for n, p in params.items() if n not in frozen_names),
        "frontier": split.frontier_names,
    }
    return rows, summary
