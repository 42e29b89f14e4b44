"""Build: from a recipe to the model that trains, with every stage's split resolved once.

The base (a zoo model, or a finished tl run as `base: {checkpoint: RUN_DIR}`)
is traced into an fx graph; surgery and the head are applied; each stage's
`freeze` is resolved into a split. This is the layer that holds the recipe:
lower layers report problems at dotted locations, and it turns them into
`file:line` problems, all at once, before any data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
from torch import fx

from tlcli.errors import RecipeError, RunError, SpecError, WeightsError, did_you_mean, out_of_memory
from tlcli.freeze import resolve_split
from tlcli.graph import ModelGraph, Split, TransferModel, frozen_extractor, trainable_part
from tlcli.recipe import FreezeSpec, Recipe, Stage
from tlcli.rundir import RunDir
from tlcli.surgery import Built, Surgeon, add_input_adapter, apply_head
from tlcli.zoo import ZooModel, build_base, model_names

Issues = list[tuple[tuple, str]]


@dataclass
class Prepared(Built):
    """The built model, every stage's split, and the split of the stage in use."""

    splits: dict[int, Split] = None  # type: ignore[assignment]
    split: Split = None  # type: ignore[assignment]

    def for_stage(self, stage: Stage) -> "Prepared":
        """The same model (shared modules) under a stage's freeze, resolved when prepared."""
        return replace(self, split=self.splits[stage.index])

    def with_freeze(self, freeze: FreezeSpec) -> "Prepared":
        """The same model under any freeze (inspection, tests); problems raise `SpecError`."""
        return replace(self, split=resolve_split(self.graph, freeze))

    def extractor(self) -> fx.GraphModule:
        return frozen_extractor(self.split)

    def trainable(self) -> fx.GraphModule:
        return trainable_part(self.split)

    def transfer_model(self) -> TransferModel:
        return TransferModel(self.model, self.split.frozen_module_names(), self.split.frozen_attr_names())


def prepare(recipe: Recipe, class_names: list[str], stage: Optional[Stage] = None, weights: bool = True) -> Prepared:
    """Build the model and split it for every stage; use `stage`'s split (the first by default).

    Every name in the surgery, head, freezes and per-layer rates is checked
    here, so a bad name in any stage fails before featurize or fit does any work.
    """
    with out_of_memory("building the model (base, surgery and head)", "lower the n_out of layers the surgery adds"):
        built, issues = _build(recipe, class_names, weights, seen=())
    stages = recipe.stage_plan()
    splits: dict[int, Split] = {}
    for s in stages:
        try:
            splits[s.index] = resolve_split(built.graph, s.freeze, s.freeze_loc)
        except SpecError as err:
            issues.extend(err.issues)
        issues.extend(_check_layer_lr(built, recipe, s))
    if issues:
        raise recipe.locate(SpecError(issues))
    chosen = splits[(stage or stages[0]).index]
    return Prepared(**{f.name: getattr(built, f.name) for f in fields(Built)}, splits=splits, split=chosen)


def build(recipe: Recipe, class_names: list[str], weights: bool = True) -> Built:
    """The base model, traced, with the recipe's surgery and head applied."""
    built, issues = _build(recipe, class_names, weights, seen=())
    if issues:
        raise recipe.locate(SpecError(issues))
    return built


def _build(recipe: Recipe, class_names: list[str], weights: bool, seen: tuple) -> tuple[Built, Issues]:
    if recipe.base.checkpoint is not None:
        graph, preprocess, source_classes = _from_run(recipe, weights, seen)
        continuing = source_classes == list(class_names)
    else:
        zoo = _from_zoo(recipe, weights)
        graph = ModelGraph.trace(zoo.model, recipe.base.zoo)
        preprocess, source_classes, continuing = zoo.preprocess, zoo.source_classes, False
    built = Built(graph, preprocess, None, len(class_names), source_classes, recipe.base.describe())
    if recipe.base.checkpoint is None:
        problem = _dry_run(graph, preprocess)
        if problem:
            return built, [(("base", "input_size") if recipe.base.input_size else ("base", "model"), problem)]
    if recipe.input is not None:
        add_input_adapter(built, recipe.input)
    issues = Surgeon(built, recipe.surgery, recipe.fine_tune.seed).run()
    if not issues:
        try:
            apply_head(built, recipe.head, recipe.fine_tune.seed, keep_trained=continuing)
        except SpecError as err:
            issues = err.issues
    return built, issues


def _dry_run(graph: ModelGraph, preprocess) -> str:
    """Why the base model cannot run on one image at the input size (a fixed-size layer, such
    as a Linear after a flatten, fits one size only), or '' when it runs."""
    try:
        graph.output_shapes(preprocess.channels, preprocess.size)
    except Exception as err:  # noqa: BLE001 - torch reports shape mismatches as several error types
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return f"the model does not run on {preprocess.size}x{preprocess.size} inputs ({reason})"
    return ""


def _from_zoo(recipe: Recipe, weights: bool) -> ZooModel:
    """The zoo model with its pretrained weights (or none, when only the
    architecture is needed: a checkpoint supplies every tensor)."""
    # Random inits (weights: none, tl zoo) must be reproducible from the recipe's seed.
    torch.manual_seed(recipe.fine_tune.seed)
    base = recipe.base
    names = model_names(base.zoo)
    if base.model not in names:
        raise recipe.locate(SpecError([(("base", "model"), f"unknown {base.zoo} model '{base.model}'{did_you_mean(base.model, names)}")]))
    try:
        return build_base(base, load_weights=weights)
    except WeightsError as err:
        raise recipe.locate(SpecError([(("base", "weights"), str(err))])) from None


def _from_run(recipe: Recipe, weights: bool, seen: tuple) -> tuple[ModelGraph, object, list[str]]:
    """A finished run as the base: its surgery replayed, then its trained tensors."""
    path = Path(recipe.base.checkpoint).expanduser()
    key = path.resolve()
    try:
        if key in seen:
            raise RunError(f"{path}: its recipe starts from itself (base checkpoint cycle)")
        run = RunDir(path)
        meta = run.read_meta()
        parent_recipe = run.read_recipe()
    except RunError as err:
        raise recipe.locate(SpecError([(("base", "checkpoint"), str(err))])) from None
    parent, issues = _build(parent_recipe, meta.class_names, weights=False, seen=(*seen, key))
    if issues:
        raise parent_recipe.locate(SpecError(issues))
    if weights:
        parent.model.load_state_dict(run.weights(), strict=True)
    return parent.graph, parent.preprocess, meta.class_names


def _check_layer_lr(built: Built, recipe: Recipe, stage: Stage) -> Issues:
    modules = [n for n, _ in built.model.named_modules() if n]
    issues = []
    for name in stage.fine_tune.layer_lr:
        if name not in modules:
            # A rate inherited from the top-level fine_tune points there, not at the stage.
            loc = ("fine_tune", "layer_lr", name) if name in recipe.fine_tune.layer_lr else stage.fine_tune_loc("layer_lr", name)
            issues.append((loc, f"unknown layer '{name}'{did_you_mean(name, modules)}"))
    return issues
