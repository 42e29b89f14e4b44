"""Build: from a recipe to its Network (base, input preprocessor, surgery, head), every stage's split resolved once.

The base is a zoo model, or a finished tl run (`base: {checkpoint: RUN_DIR}`)
whose own recipe is replayed and whose trained tensors are loaded. It is
traced into an fx graph; the input preprocessor, the surgery and the head
edit the graph; each planned stage's `freeze` is resolved into a split.
Every name in surgery, head, freezes and per-layer rates is checked here,
so a bad name in any stage fails before featurize or fit reads any data.
The builder takes the recipe it builds from, so it alone turns its lower
layers' dotted problems into that recipe's `file:line` lines, all at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from tlcli.config.schema import Recipe
from tlcli.config.stages import Stage, plan_stages
from tlcli.errors import RunError, SpecError, WeightsError, did_you_mean, out_of_memory
from tlcli.model.freeze import resolve_split
from tlcli.model.graph import ModelGraph
from tlcli.model.network import Network
from tlcli.model.surgery import Surgeon, add_input_adapter, apply_head
from tlcli.model.zoo import Pretrained, build_base, model_names, registered_size

Issues = list[tuple[tuple, str]]


def build_network(recipe: Recipe, class_names: list[str], stage: Optional[Stage] = None,
                  weights: bool = True) -> Network:
    """The recipe's network, its stages planned and each one's split resolved, under `stage`'s
    split (the first's by default). `weights=False` builds the architecture alone: a checkpoint
    will supply every tensor. Problems raise this recipe's RecipeError, all at once."""
    with recipe.located(), out_of_memory("building the model (base, surgery and head)",
                                         "lower the n_out of layers the surgery adds"):
        network, issues = _build(recipe, class_names, weights, seen=())
        network.stages = stages = plan_stages(recipe)
        for s in stages:
            try:
                network.splits[s.index] = resolve_split(network.graph, s.freeze, s.freeze_loc)
                issues.extend(_check_something_trains(network, s))
            except SpecError as err:
                issues.extend(err.issues)
            issues.extend(_check_layer_lr(network, recipe, s))
            issues.extend(_check_class_weights(s, class_names))
        if issues:
            raise SpecError(issues)
    return network.for_stage(stage or stages[0])


def _build(recipe: Recipe, class_names: list[str], weights: bool, seen: tuple) -> tuple[Network, Issues]:
    if recipe.base.checkpoint is not None:
        graph, preprocess, source_classes = _from_run(recipe, weights, seen)
        continuing = source_classes == list(class_names)
    else:
        zoo = _from_zoo(recipe, weights)
        graph = _traced(zoo.model, recipe)
        preprocess, source_classes, continuing = zoo.preprocess, zoo.source_classes, False
    network = Network(graph, preprocess, None, len(class_names), source_classes, recipe.base.describe())
    if recipe.base.checkpoint is None:
        problem = _dry_run(graph, preprocess)
        registered = registered_size(recipe.base)
        if problem and recipe.base.input_size and registered and registered != recipe.base.input_size:
            # A family whose attention biases or grid are fixed at construction, and not by img_size.
            problem += f"; {recipe.base.model} is built for {registered}x{registered}: leave base.input_size out"
        if problem:
            return network, [(("base", "input_size") if recipe.base.input_size else ("base", "model"), problem)]
    if recipe.input is not None:
        add_input_adapter(network, recipe.input)
    issues = Surgeon(network, recipe.surgery, recipe.fine_tune.seed).run()
    if not issues:
        try:
            apply_head(network, recipe.head, recipe.fine_tune.seed, keep_trained=continuing)
        except SpecError as err:
            issues = err.issues
        else:
            issues = _head_fits(network)
    return network, issues


def _head_fits(network: Network) -> list:
    """A head layer with layers after it (head.layer naming fc1 of fc1 -> fc2) now gives one
    output per class, which the next layer does not take: said at head.layer, before any run."""
    graph = network.graph
    if network.head_layer is None or network.head_layer == graph.classifier_layers()[-1]:
        return []
    reason = _why_it_does_not_run(graph, network.preprocess)
    if not reason:
        return []
    return [(("head", "layer"), f"'{network.head_layer}' is not the model's last classifier layer, and with one output "
                                f"per class ({network.num_classes}) the layers after it no longer fit ({reason}); "
                                f"name the classifier ('{graph.classifier_layers()[-1]}')")]


def _traced(model, recipe: Recipe) -> ModelGraph:
    try:
        return ModelGraph.trace(model, recipe.base.zoo)
    except Exception as err:  # noqa: BLE001 - fx fails as TraceError, TypeError, RuntimeError, ...
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise SpecError([(("base", "model"), f"torch.fx cannot trace {recipe.base.model}, and tl freezes and splits "
                                             f"models by their fx graph ({type(err).__name__}: {reason})")]) from None


def _dry_run(graph: ModelGraph, preprocess) -> str:
    """Why the base model cannot run on one image at the input size (a fixed-size layer, such
    as a Linear after a flatten, fits one size only), or '' when it runs."""
    reason = _why_it_does_not_run(graph, preprocess)
    return f"the model does not run on {preprocess.size}x{preprocess.size} inputs ({reason})" if reason else ""


def _why_it_does_not_run(graph: ModelGraph, preprocess) -> str:
    try:
        graph.output_shapes(preprocess.channels, preprocess.size)
    except Exception as err:  # noqa: BLE001 - torch reports shape mismatches as several error types
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ""


def _from_zoo(recipe: Recipe, weights: bool) -> Pretrained:
    """The zoo model with its pretrained weights (or none, when only the
    architecture is needed: a checkpoint supplies every tensor)."""
    # Random inits (weights: none, tl zoo) must be reproducible from the recipe's seed.
    torch.manual_seed(recipe.fine_tune.seed)
    base = recipe.base
    names = model_names(base.zoo)
    if base.model not in names:
        raise SpecError([(("base", "model"), f"unknown {base.zoo} model '{base.model}'{did_you_mean(base.model, names)}")])
    try:
        return build_base(base, load_weights=weights)
    except WeightsError as err:
        raise SpecError([(("base", "weights"), str(err))]) from None


def _from_run(recipe: Recipe, weights: bool, seen: tuple) -> tuple[ModelGraph, object, list[str]]:
    """A finished run as the base: its surgery replayed, then its trained tensors."""
    from tlcli.run.rundir import RunDir

    path = Path(recipe.base.checkpoint)
    key = path.resolve()
    try:
        if key in seen:
            raise RunError(f"{path}: its recipe starts from itself (base checkpoint cycle)")
        run = RunDir(path, writer=False)
        meta = run.read_meta()
        parent_recipe = run.read_recipe()
        parent, issues = _build(parent_recipe, meta.class_names, weights=False, seen=(*seen, key))
        if issues:
            raise RunError(f"{path}: its recipe no longer builds:\n{parent_recipe.locate(SpecError(issues))}")
    except RunError as err:
        raise SpecError([(("base", "checkpoint"), str(err))]) from None
    if weights:
        parent.model.load_state_dict(run.weights(), strict=True)
    return parent.graph, parent.preprocess, meta.class_names


def _check_class_weights(stage: Stage, class_names: list[str]) -> Issues:
    weights = stage.fine_tune.class_weights
    if not isinstance(weights, dict):
        return []
    return [(stage.fine_tune_loc("class_weights", name), f"unknown class '{name}'{did_you_mean(name, class_names)} "
                                                         f"(classes: {', '.join(class_names)})")
            for name in weights if name not in class_names]


def _check_something_trains(network: Network, stage: Stage) -> Issues:
    """A boundary at (or past) the model's output freezes every parameter: refused at validate."""
    frozen = set(network.splits[stage.index].frozen_state_names(network.model))
    if any(name not in frozen for name, _ in network.model.named_parameters()):
        return []
    return [((*stage.freeze_loc, *stage.freeze.loc), "everything is frozen: there is nothing left to train (move the "
                                                     "boundary before the head; 'tl inspect' lists the nodes)")]


def _check_layer_lr(network: Network, recipe: Recipe, stage: Stage) -> Issues:
    modules = [n for n, _ in network.model.named_modules() if n]
    issues = []
    for name in stage.fine_tune.layer_lr:
        if name not in modules:
            # A rate inherited from the top-level fine_tune points there, not at the stage.
            loc = ("fine_tune", "layer_lr", name) if name in recipe.fine_tune.layer_lr else stage.fine_tune_loc("layer_lr", name)
            issues.append((loc, f"unknown layer '{name}'{did_you_mean(name, modules)}"))
    return issues
