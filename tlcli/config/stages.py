"""Stage planning: the recipe's stages resolved once, each with its freeze, fine_tune and input, and the settings they ignore. Imports no torch.

A stage overrides any `fine_tune` key of the recipe's; a stage without a
freeze inherits the one before it; `input: auto` trains on the cache when
the stage does not augment and freezes what the first stage freezes.
Commands plan the stages once and pass the plan down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import ValidationError

from tlcli.config.schema import AugmentSpec, FineTuneSpec, FreezeSpec, Recipe, StageSpec
from tlcli.errors import Problem


@dataclass(frozen=True)
class Stage:
    """A stage with its settings resolved (recipe defaults + stage overrides)."""

    index: int
    name: str
    freeze: FreezeSpec
    fine_tune: FineTuneSpec
    augment: Optional[AugmentSpec]
    input: str  # "cache" or "images"
    loc: tuple  # where problems with this stage point
    freeze_loc: tuple = ("freeze",)  # where its freeze was written (inherited: the stage or top level that wrote it)

    def fine_tune_loc(self, *rest) -> tuple:
        """Where a fine_tune key of this stage points: the stage's own override, else the top level."""
        return (*self.loc, "fine_tune", *rest) if self.loc else ("fine_tune", *rest)


def merged_fine_tune(base: "FineTuneSpec", spec: "StageSpec") -> "FineTuneSpec":
    """The recipe's fine_tune with a stage's overrides on top; raises pydantic's ValidationError."""
    overrides = spec.fine_tune.model_dump(exclude_none=True) if spec.fine_tune is not None else {}
    if spec.epochs is not None:
        overrides["epochs"] = spec.epochs
    return FineTuneSpec.model_validate({**base.model_dump(), **overrides})



def plan_stages(recipe: Recipe) -> list[Stage]:
    """The stages with defaults filled in. Without `stages:`, one stage made
    of the recipe's own freeze, fine_tune and augment."""
    if not recipe.stages:
        source = "images" if recipe.augment is not None else "cache"
        return [Stage(0, "fit", recipe.freeze, recipe.fine_tune, recipe.augment, source, ())]
    plan: list[Stage] = []
    for i, spec in enumerate(recipe.stages):
        # Validated in _check_semantics; a recipe that parsed has a valid merge.
        ft = merged_fine_tune(recipe.fine_tune, spec)
        if spec.freeze is not None:
            freeze, freeze_loc = spec.freeze, ("stages", i, "freeze")
        elif plan:
            freeze, freeze_loc = plan[-1].freeze, plan[-1].freeze_loc
        else:
            freeze, freeze_loc = recipe.freeze, ("freeze",)
        source = spec.input
        if source == "auto":
            moved = bool(plan) and freeze != plan[0].freeze
            source = "images" if spec.augment is not None or moved else "cache"
        plan.append(Stage(i, spec.name or f"stage{i + 1}", freeze, ft, spec.augment, source, ("stages", i), freeze_loc))
    return plan




def stage_problems(recipe: Recipe) -> list[Problem]:
    """Checks that span sections, which the per-section schema cannot see."""
    problems = []
    cache_reason = "the cache holds un-augmented activations; train this stage on images (input: images)"
    if recipe.stages and recipe.augment is not None:
        problems.append(recipe.problem(("augment",), "with stages, declare augment inside the stage that trains on images"))
    for i, spec in enumerate(recipe.stages):
        if spec.augment is not None and spec.input == "cache":
            problems.append(recipe.problem(("stages", i, "augment"), f"augmentation with input: cache: {cache_reason}"))
        try:
            merged_fine_tune(recipe.fine_tune, spec)
        except ValidationError as err:
            for e in err.errors():
                problems.append(recipe.problem(("stages", i, "fine_tune", *e["loc"]), str(e.get("ctx", {}).get("error", e["msg"]))))
    if problems:
        return problems
    for stage in plan_stages(recipe):
        if stage.fine_tune.optimizer == "lbfgs" and stage.input == "images":
            own = stage.loc and recipe.stages[stage.index].fine_tune and "optimizer" in recipe.stages[stage.index].fine_tune.model_fields_set
            where = f" (stage '{stage.name}')" if stage.loc else ""
            problems.append(recipe.problem((*stage.loc, "fine_tune", "optimizer") if own else ("fine_tune", "optimizer"),
                                           f"lbfgs fits a Linear head on cached features, but this stage{where} trains "
                                           "on images (augment, input: images, or a boundary moved from the first stage's); use adam"))
    return list(dict.fromkeys(problems))


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What validates but is likely not what the user meant, each at its line (in line order): a
    missing freeze, and every setting the recipe's own choices make tl ignore (those that depend on
    what `optimizer: auto` resolves to are told by `ignored_by_optimizer` when fit resolves it)."""
    found = []
    first_freeze = recipe.stages[0].freeze if recipe.stages else None
    if recipe.base.checkpoint is None and "freeze" not in recipe.model_fields_set and first_freeze is None:
        found.append(recipe.problem(("freeze",), "not given: the whole network trains, end to end. "
                                    "Write 'freeze: none' to say so, or 'freeze: {until: NODE}' to train "
                                    "only what follows NODE ('tl inspect' lists the nodes)"))
    stages = plan_stages(recipe)
    for stage in stages:
        if stage.fine_tune.optimizer != "auto":
            found += ignored_by_optimizer(recipe, stage, stage.fine_tune.optimizer)
        elif stage.fine_tune.schedule != "step":
            found += ignored_keys(recipe, stage, ("step_epochs", "step_gamma"),
                                  f"schedule {stage.fine_tune.schedule} has no steps; it is read with schedule: step")
    if recipe.head.layer == "none" and "init" in recipe.head.model_fields_set:
        found.append(recipe.problem(("head", "init"), "ignored: head: {layer: none} replaces no layer"))
    for stage in stages:
        if stage.augment is not None and stage.augment.changes_nothing:
            found.append(recipe.problem((*stage.loc, "augment"), "augments nothing (hflip 0, no random_resized_crop, no "
                                        "color_jitter): the stage trains on images, un-augmented; without "
                                        "augment it would train from the feature cache"))
    if not any(s.input == "cache" for s in stages):
        # memory_mib also holds an un-augmented image stage's decoded images.
        read = {"memory_mib"} if any(s.augment is None or s.augment.changes_nothing for s in stages) else set()
        for key in sorted({"dtype", "shard_size", "memory_mib", "compile"} - read & recipe.cache.model_fields_set):
            found.append(recipe.problem(("cache", key), "ignored: no stage trains from the feature cache"))
    found += _ignored_by_layer_type(recipe)
    if recipe.data.dataset == "digits" and "on_bad_image" in recipe.data.model_fields_set:
        found.append(recipe.problem(("data", "on_bad_image"), "ignored: the built-in digits are not decoded from files"))
    found.sort(key=lambda p: p.line or 0)
    return list(dict.fromkeys(map(str, found)))  # a top-level key read by several stages is told once


# What each type of added node reads, beside name, type and inputs.
_ADD_READS = {"linear": {"n_out", "bias", "init", "activation", "lr"}, "conv1x1": {"n_out", "bias", "init", "activation", "lr"},
              "batchnorm": {"lr"}, "dropout": {"p"}, "activation": {"fn"}, "flatten": set(), "concat": set(), "add": set()}
_POOL_READS = {"avg": {"pool", "kernel", "stride"}, "max": {"pool", "kernel", "stride"},
               "adaptive_avg": {"pool", "output_size"}, "adaptive_max": {"pool", "output_size"}}


def _ignored_by_layer_type(recipe: Recipe) -> list[Problem]:
    found = []
    for i, op in enumerate(recipe.surgery):
        add = op.add
        if add is None:
            continue
        reads = _POOL_READS.get(add.pool, {"pool"}) if add.type == "pooling" else _ADD_READS[add.type]
        for key in sorted(add.model_fields_set - reads - {"name", "type", "inputs"}):
            found.append(recipe.problem(("surgery", i, "add", key), f"ignored: a {add.type} node does not read it"))
    return found


# What a full-batch L-BFGS fit with a line search does not use: it takes the whole train split as
# one batch, finds its own step size, and fits plain cross-entropy plus the L2 (weight_decay).
_LBFGS_IGNORES = ("lr", "schedule", "warmup_epochs", "batch_size", "label_smoothing", "grad_clip", "momentum",
                  "decay_norm_and_bias", "step_epochs", "step_gamma")


def ignored_by_optimizer(recipe: Recipe, stage: Stage, optimizer: str) -> list[Problem]:
    """The fine_tune keys this stage's user wrote that `optimizer` (as resolved) does not read,
    each as a warning at the line that set it."""
    ft = stage.fine_tune
    if optimizer == "lbfgs":
        how = "optimizer auto fits this head with L-BFGS" if ft.optimizer == "auto" else "lbfgs fits this head"
        found = ignored_keys(recipe, stage, _LBFGS_IGNORES, f"{how} (full batch, its own step size); "
                                                            "set optimizer: adam to use it")
        if ft.early_stopping is not None:
            found += ignored_keys(recipe, stage, ("refit",), "early stopping keeps the epoch that scored best on val, "
                                                             "fitted without it")
        elif stage.index < len(recipe.stages) - 1:
            found += ignored_keys(recipe, stage, ("refit",), "a later stage trains on from this one; a head refitted "
                                                             "on val would leave that stage's val scores not held out")
        return found
    found = ignored_keys(recipe, stage, ("refit",), f"{optimizer} keeps val held out; refit is read by the probe fit "
                                                    "(optimizer auto on a lone Linear head, or lbfgs)")
    if optimizer in ("adam", "adamw"):
        found += ignored_keys(recipe, stage, ("momentum",), f"{optimizer} has no momentum setting (it is read by sgd "
                                                            "and rmsprop)")
    if ft.schedule != "step":
        found += ignored_keys(recipe, stage, ("step_epochs", "step_gamma"),
                              f"schedule {ft.schedule} has no steps; it is read with schedule: step")
    return found


def ignored_keys(recipe: Recipe, stage: Stage, keys: tuple, why: str) -> list[Problem]:
    """A warning at the line of each of `keys` the user set for this stage (its own fine_tune, or
    the top-level one it inherits), saying it is ignored and why."""
    own = set(recipe.stages[stage.index].fine_tune.model_fields_set) if stage.loc and recipe.stages[stage.index].fine_tune else set()
    top = set(recipe.fine_tune.model_fields_set)
    found = []
    for key in keys:
        if key in own:
            found.append(recipe.problem((*stage.loc, "fine_tune", key), f"ignored: {why}"))
        elif key in top:
            where = f" in stage '{stage.name}'" if stage.loc else ""  # other stages may read it
            found.append(recipe.problem(("fine_tune", key), f"ignored{where}: {why}"))
    return found
