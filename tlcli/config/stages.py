"""Stage planning: the recipe's stages resolved once, each with its freeze, fine_tune and input. Imports no torch.

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
    return problems


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What validates but is likely not what the user meant, each at its line."""
    found = []
    first_freeze = recipe.stages[0].freeze if recipe.stages else None
    if recipe.base.checkpoint is None and "freeze" not in recipe.model_fields_set and first_freeze is None:
        found.append(str(recipe.problem(("freeze",), "not given: the whole network trains, end to end. "
                                      "Write 'freeze: none' to say so, or 'freeze: {until: NODE}' to train "
                                      "only what follows NODE ('tl inspect' lists the nodes)")))
    return found

