"""Surgery: from a recipe to a model with a new head, frozen up to a boundary.

The number of classes comes from the data (DL4J's nOut from the data set), so
this stage takes the resolved `DataPlan`'s class count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx, nn

from tlcli.errors import RecipeError, WeightsError, did_you_mean
from tlcli.graph import ModelGraph, Split, TransferModel, frozen_extractor, split_at, trainable_part
from tlcli.recipe import Recipe
from tlcli.zoo import BaseModel, Preprocess, build_base, model_names, replace_head, resolve_head_layer


@dataclass
class Prepared:
    model: nn.Module  # the full model, head replaced; parameters shared with the parts below
    graph: ModelGraph
    split: Split
    preprocess: Preprocess
    head_layer: str
    num_classes: int
    source_classes: Optional[list[str]]

    def extractor(self) -> fx.GraphModule:
        return frozen_extractor(self.split)

    def trainable(self) -> fx.GraphModule:
        return trainable_part(self.split)

    def transfer_model(self) -> TransferModel:
        return TransferModel(self.model, self.split.frozen_module_names(), self.split.frozen_attr_names())


def build_model(recipe: Recipe) -> BaseModel:
    # Random inits (weights: none, tl zoo) must be reproducible from the recipe's seed.
    torch.manual_seed(recipe.fine_tune.seed)
    names = model_names(recipe.base.zoo)
    if recipe.base.model not in names:
        raise RecipeError([recipe.problem(
            ("base", "model"), f"unknown {recipe.base.zoo} model '{recipe.base.model}'{did_you_mean(recipe.base.model, names)}"
        )])
    try:
        return build_base(recipe.base)
    except WeightsError as err:
        raise RecipeError([recipe.problem(("base", "weights"), str(err))]) from None


def prepare(recipe: Recipe, num_classes: int) -> Prepared:
    base = build_model(recipe)
    head_layer = resolve_head_layer(recipe.head, base)
    module_names = [n for n, _ in base.model.named_modules() if n]
    if head_layer not in module_names:
        raise RecipeError([recipe.problem(("head", "layer"), f"unknown layer '{head_layer}'{did_you_mean(head_layer, module_names)}")])
    replace_head(base.model, head_layer, num_classes, recipe.head.init, recipe.fine_tune.seed)
    graph = ModelGraph.trace(base.model, recipe.base.zoo)
    split = split_at(graph, resolve_boundary(recipe, graph))
    return Prepared(base.model, graph, split, base.preprocess, head_layer, num_classes, base.source_classes)


def resolve_boundary(recipe: Recipe, graph: ModelGraph) -> list[fx.Node]:
    problems, nodes = [], []
    names = recipe.freeze.nodes
    for i, name in enumerate(names):
        loc = ("freeze", "until") if isinstance(recipe.freeze.until, str) else ("freeze", "until", i)
        node = graph.resolve(name)
        if node is None:
            problems.append(recipe.problem(loc, f"unknown node '{name}'{graph.suggest(name)} (tl inspect lists them)"))
        else:
            nodes.append(node)
    if problems:
        raise RecipeError(problems)
    return nodes
