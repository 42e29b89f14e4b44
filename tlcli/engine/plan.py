"""The plan: what a command decides before it does any work, decided once and passed down.

A plan holds the recipe (what a run saves, and where its lines are), its
stages, the device, this process's place under torchrun, the data (images,
labels, splits) and the network with every stage's split. Commands make one
plan and hand it down; nothing below re-plans, re-reads the recipe or
decides the device again. Problems found while planning are the recipe's,
at their lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tlcli.config.schema import Recipe
from tlcli.config.stages import Stage, plan_stages
from tlcli.data.digests import index_path
from tlcli.data.sources import DataPlan, plan_data, size_hint
from tlcli.engine import distributed
from tlcli.engine.device import make_deterministic, resolve_device
from tlcli.errors import SpecError
from tlcli.model.build import build_network
from tlcli.model.network import Network
from tlcli.progress import Reporter


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    stages: list[Stage]
    device: torch.device
    dist: distributed.Dist
    data: DataPlan
    network: Network  # under the first stage's split; `network.for_stage(s)` for the others
    hint: Optional[str] = None  # advice worth printing once (images far smaller than the input)

    def report_hints(self, reporter: Reporter) -> None:
        if self.hint and self.dist.main:
            reporter.info(f"hint: {self.hint}")


def make_plan(recipe: Recipe) -> Plan:
    """The recipe planned: stages, device (joined to the process group under torchrun), data,
    network. Raises the recipe's located errors, all of one kind at once."""
    stages = plan_stages(recipe)
    with recipe.located():
        device = resolve_device(recipe.device)
        make_deterministic(device)
        data = plan_data(recipe.data, index_path(recipe.cache.dir))
        _check_stages_against_data(stages, data)
    network = build_network(recipe, data.class_names, stages=stages)
    dist = distributed.init(device, recipe.distributed.timeout_s)
    return Plan(recipe, stages, device, dist, data, network, size_hint(data, network.preprocess.size))


def _check_stages_against_data(stages: list[Stage], data: DataPlan) -> None:
    """What a stage needs of the data, checked before anything is built or written."""
    issues = [(s.fine_tune_loc("early_stopping"), "early stopping watches the validation split; set data.split.val > 0")
              for s in stages if s.fine_tune.early_stopping is not None and not data.splits.get("val")]
    if issues:
        raise SpecError(issues)
