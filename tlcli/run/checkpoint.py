"""A finished run, saved and read back once: its recipe, its checkpoint record and the model they rebuild.

The architecture is rebuilt from the run's own saved recipe (surgery
replayed) without its original weights, which may have been a download or a
file since moved; every tensor then comes from `model.safetensors`, checked
against the record. Evaluate, predict and export each load a Run once and
take everything from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tlcli.config.reading import anchored
from tlcli.config.schema import Recipe
from tlcli.errors import RunError
from tlcli.model.build import build_network
from tlcli.model.graph import PinnedNet
from tlcli.model.network import Network
from tlcli.model.preprocess import Preprocess
from tlcli.model.weights import require_sound
from tlcli.run.records import CheckpointMeta
from tlcli.run.rundir import CHECKPOINT, DAMAGED, WEIGHTS, RunDir, find_run

# What a command's overrides may change about a finished run: how it runs now, never the
# model, the data or the split, which the checkpoint and the saved recipe fix.
USE_OVERRIDES = ("data.batch_size", "data.num_workers", "data.on_bad_image", "device")


@dataclass
class Run:
    dir: RunDir
    recipe: Recipe  # the run's saved recipe, with the command's overrides of how to use it
    meta: CheckpointMeta
    network: Network  # under the last stage's split: frozen part, frontier, trainable part
    model: PinnedNet  # the full model, in eval mode

    @property
    def preprocess(self) -> Preprocess:
        return self.meta.preprocess

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names


def load_run(target: Optional[Path], overrides: tuple[str, ...] = ()) -> Run:
    """The run a command names (a run directory, a recipe, or the last fit here), read once."""
    run = find_run(Path(target) if target is not None else None, overrides)
    return load_checkpoint(run.path, _use_overrides(run, overrides))


def _use_overrides(run: RunDir, overrides: tuple[str, ...]) -> tuple[str, ...]:
    """The overrides of how to use the run. One that restates the run's own value (the command
    line that fit it, repeated) is dropped; one that would change its model, data or split is refused."""
    used = tuple(o for o in overrides if o.partition("=")[0].strip() in USE_OVERRIDES)
    rest = [o for o in overrides if o not in used and o.partition("=")[0].strip() != "output_dir"]
    if rest:
        saved = anchored(run.read_recipe()).model_dump()  # paths compare as the run saved them: absolute
        for override in rest:
            if anchored(run.read_recipe((override,))).model_dump() != saved:
                raise RunError(f"override {override.partition('=')[0].strip()}: differs from the finished run's own; "
                               "a run's model, data and split are fixed when it is fit, and overrides choose the run "
                               f"(output_dir) and how it runs now ({', '.join(USE_OVERRIDES)})")
    return used


def load_checkpoint(run_dir, overrides: tuple[str, ...] = ()) -> Run:
    """The finished run in `run_dir`, its saved recipe read with `overrides` of how to use it."""
    run = RunDir(run_dir)
    meta, state, recipe = run.read_finished(overrides)
    network = build_network(recipe, meta.class_names, weights=False)
    network = network.for_stage(network.stages[-1])
    if [s.name for s in meta.stages] != [s.name for s in network.stages]:
        raise RunError(f"{run / CHECKPOINT}: damaged (its stages are not the run's recipe's); {DAMAGED}")
    split = network.split
    if meta.preprocess != network.preprocess:
        raise RunError(f"{run / CHECKPOINT}: damaged (its preprocessing is not what the run's recipe gives); {DAMAGED}")
    if (meta.frozen_modules, meta.frozen_attrs) != (split.frozen_module_names(), split.frozen_attr_names()):
        raise RunError(f"{run / CHECKPOINT}: damaged (frozen_modules and frozen_attrs are not what the run's recipe "
                       f"freezes); {DAMAGED}")
    require_sound(state, network.model.state_dict(), run / WEIGHTS, RunError, f"; {DAMAGED}")
    try:
        network.model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing, unexpected or reshaped tensors: the file does not fit
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise RunError(f"{run / WEIGHTS}: does not fit the run's model ({first}); {DAMAGED}") from None
    model = network.pinned()
    model.eval()
    return Run(run, recipe, meta, network, model)


def save_checkpoint(run: RunDir, pinned: PinnedNet, meta: CheckpointMeta) -> None:
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in pinned.net.state_dict().items()}
    meta = meta.model_copy(update={"frozen_modules": pinned.frozen_modules, "frozen_attrs": pinned.frozen_attrs})
    run.save_checkpoint(state, meta)
