"""The plan: what a command decides before it does any work, decided once and passed down.

A plan holds the recipe (what a run saves, and where its lines are), its
stages, the device, this process's place under torchrun, the data (images,
labels, splits), the network with every stage's split, and the precision. Commands make one
plan and hand it down; nothing below re-plans, re-reads the recipe or
decides the device again. Problems found while planning are the recipe's,
at their lines.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from tlcli.config.schema import Recipe
from tlcli.config.stages import Stage
from tlcli.data.digests import index_path
from tlcli.data.sources import DataPlan, plan_data, size_hint
from tlcli.engine import distributed
from tlcli.engine.device import make_deterministic, resolve_device
from tlcli.engine.precision import Precision, resolve_precision
from tlcli.model.build import build_network
from tlcli.model.network import Network
from tlcli.progress import Reporter
from tlcli.run.tracking import require_trackers


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    stages: list[Stage]
    device: torch.device
    dist: distributed.Dist
    data: DataPlan
    network: Network  # under the first stage's split; `network.for_stage(s)` for the others
    precision: Precision  # the arithmetic the frozen part and image stages run in, on this device

    def report_hints(self, reporter: Reporter) -> None:
        """Advice worth printing once per command: images far smaller than the model's input, and
        settings this plan ignores (a split for a folder split on disk, torchrun's without it)."""
        if not self.dist.main:
            return
        hint = size_hint(self.data, self.network.preprocess.size)
        if hint:
            reporter.info(f"hint: {hint}")
        recipe = self.recipe
        if set(self.data.on_disk) == {"train", "val", "test"} and "split" in recipe.data.model_fields_set:
            where = (f"{self.data.table}'s {recipe.data.split_column} column gives train, val and test"
                     if self.data.table else f"{self.data.root} is split on disk into train/, val/ and test/")
            reporter.warn(str(recipe.problem(("data", "split"), f"ignored: {where}")))
        if not self.dist.enabled:
            for key in sorted(recipe.distributed.model_fields_set):
                reporter.warn(str(recipe.problem(("distributed", key), "ignored: read under torchrun only "
                                                                        "(this is one process)")))

    def precision_hint(self, reporter: Reporter) -> None:
        """After the work, once: on hardware with native bf16, a recipe that left `precision` at
        its default (fp32; docs/performance.md says why) hears that bf16 is one line away."""
        if not self.dist.main or "precision" in self.recipe.model_fields_set:
            return
        native = resolve_precision("auto", self.device)
        if native.bf16:
            why = native.reason.removeprefix("bf16 autocast: ").removesuffix(" (precision: auto)")
            reporter.info(f"hint: {why}; `precision: auto` runs the frozen part in bf16 autocast here, "
                          "faster, and within 1 pt of fp32 on our four folders (docs/performance.md)")


def make_plan(recipe: Recipe) -> Plan:
    """The recipe planned, from the device down: the device (joined to the process group under
    torchrun), the data, then the network with its stages. Raises the recipe's located errors."""
    with recipe.located():
        device = resolve_device(recipe.device)
        precision = resolve_precision(recipe.precision, device)
        require_trackers(recipe)
    make_deterministic(device)
    dist = distributed.init(device, recipe.distributed.timeout_s)
    with recipe.located():
        data = plan_data(recipe.data, index_path(recipe.cache.dir))
    network = build_network(recipe, data.class_names)
    return Plan(recipe, network.stages, device, dist, data, network, precision)
