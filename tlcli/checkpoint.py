"""A run directory's checkpoint: enough to rebuild the full model offline.

`model.safetensors` holds the full state dict (frozen part included);
`checkpoint.json` holds the model spec, head, frozen set, class names and
preprocessing. It is written last, so its presence marks a finished run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from tlcli import __version__
from tlcli.errors import RunError
from tlcli.graph import TransferModel
from tlcli.zoo import Preprocess

CHECKPOINT = "checkpoint.json"
WEIGHTS = "model.safetensors"


@dataclass
class Checkpoint:
    meta: dict
    model: TransferModel

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.meta["preprocess"])

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]


def write_json_atomic(path: Path, obj) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=1))
    os.replace(part, path)


def save_checkpoint(run_dir: Path, transfer: TransferModel, meta: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in transfer.net.state_dict().items()}
    part = run_dir / (WEIGHTS + ".part")
    save_file(state, str(part))
    os.replace(part, run_dir / WEIGHTS)
    meta = {**meta, "tl_version": __version__, "frozen_modules": transfer.frozen_modules, "frozen_attrs": transfer.frozen_attrs}
    write_json_atomic(run_dir / CHECKPOINT, meta)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    from tlcli.surgery import prepare, read_run

    recipe, meta = read_run(run_dir)
    # The architecture is rebuilt from the run's own recipe (surgery included)
    # without its original weights, which may have been a download or a file
    # since moved; every tensor comes from the checkpoint.
    prepared = prepare(recipe, meta["class_names"], weights=False)
    state = load_file(str(run_dir / WEIGHTS))
    prepared.model.load_state_dict(state, strict=True)
    model = TransferModel(prepared.model, meta["frozen_modules"], meta.get("frozen_attrs", []))
    model.eval()
    return Checkpoint(meta, model)


def finished(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT).is_file()

