"""Checkpoint: save a trained model into its run directory, and rebuild it offline from there.

The architecture is rebuilt from the run's own saved recipe (surgery
replayed) without its original weights, which may have been a download or a
file since moved; every tensor then comes from `model.safetensors`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlcli.build import Prepared, prepare
from tlcli.errors import RunError
from tlcli.graph import TransferModel
from tlcli.preprocess import Preprocess
from tlcli.rundir import CHECKPOINT, WEIGHTS, CheckpointMeta, RunDir
from tlcli.weights import require_sound


@dataclass
class Checkpoint:
    meta: CheckpointMeta
    model: TransferModel
    prepared: Prepared  # the same model under the last stage's split (frozen part, frontier, trainable part)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.meta.preprocess.model_dump())

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names


def save_checkpoint(run: RunDir, transfer: TransferModel, meta: CheckpointMeta) -> None:
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in transfer.net.state_dict().items()}
    meta = meta.model_copy(update={"frozen_modules": transfer.frozen_modules, "frozen_attrs": transfer.frozen_attrs})
    run.save_checkpoint(state, meta)


def load_checkpoint(run_dir) -> Checkpoint:
    run = RunDir(run_dir)
    meta = run.read_meta()
    recipe = run.read_recipe()
    prepared = prepare(recipe, meta.class_names, recipe.stage_plan()[-1], weights=False)
    split = prepared.split
    if (meta.frozen_modules, meta.frozen_attrs) != (split.frozen_module_names(), split.frozen_attr_names()):
        raise RunError(f"{run / CHECKPOINT}: damaged (frozen_modules and frozen_attrs are not what the run's recipe "
                       "freezes); fit the run again with --force")
    state = run.weights()
    require_sound(state, prepared.model.state_dict(), run / WEIGHTS, RunError, "; fit the run again with --force")
    try:
        prepared.model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # missing, unexpected or reshaped tensors: the file does not fit
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise RunError(f"{run / WEIGHTS}: does not fit the run's model ({first}); fit the run again with --force") from None
    model = prepared.transfer_model()
    model.eval()
    return Checkpoint(meta, model, prepared)
