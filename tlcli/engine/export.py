"""Export: a trained run as one file that needs neither tl nor timm to run.

The exported model takes uint8 images, NCHW, at the model's input size (the
caller decodes and resizes), applies the run's own normalisation, and returns
class probabilities. `PATH.json` beside it holds the class names, the input
size and the preprocessing that produced the training inputs.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tlcli.run.checkpoint import load_run
from tlcli.errors import TLError
from tlcli.files import atomic_write, claim_outputs, write_json_atomic
from tlcli.model.preprocess import Preprocess, normalized
from tlcli.run.rundir import EXPORTS


class Deployable(nn.Module):
    """uint8 NCHW images -> class probabilities, with the run's normalisation inside."""

    def __init__(self, net: nn.Module, pp: Preprocess):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(pp.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pp.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(normalized(images, self.mean, self.std)), dim=1)


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    format: str


def export(target: Optional[Path], fmt: str, output: Optional[Path] = None, force: bool = False) -> ExportResult:
    """Write the model and `PATH.json`. Without `output`, into the run under a name it owns
    (replaced on a new export); a path the user names, and its sidecar, are never
    replaced without `force`."""
    if fmt not in EXPORTS:
        raise TLError(f"--format {fmt}: not one of {', '.join(EXPORTS)}")
    if output is not None:  # before any work: a refusal costs nothing
        claim_outputs([Path(output), _sidecar(Path(output))], force)
    run = load_run(target)
    path = Path(output) if output is not None else run.dir.export_path(fmt)
    sidecar = _sidecar(path)
    pp = run.preprocess
    model = Deployable(run.model.net, pp).eval()
    example = torch.zeros(2, pp.channels, pp.size, pp.size, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _onnx_bytes(model, example) if fmt == "onnx" else _torchscript_bytes(model, example)
    atomic_write(path, data)
    write_json_atomic(sidecar, {
        "format": fmt,
        "input": {"name": "images", "dtype": "uint8", "layout": "NCHW",
                  "shape": ["batch", pp.channels, pp.size, pp.size]},
        "output": {"name": "probabilities", "shape": ["batch", len(run.class_names)]},
        "class_names": run.class_names,
        "input_size": pp.size,
        "mean": list(pp.mean),
        "std": list(pp.std),
        # How training images reached input_size; do the same before calling the model.
        "resize": {"mode": pp.mode, "resize": pp.resize, "interpolation": pp.interpolation, "antialias": True},
        "model": run.meta.model,
        # The export computes in fp32; the run trained its frozen part at this precision.
        "trained_precision": run.meta.precision,
    })
    return ExportResult(path, sidecar, fmt)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _torchscript_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    # TorchScript is deprecated in favour of torch.export, but it is still what C++
    # (libtorch) and many serving stacks load; the warning is not the user's to act on.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise TLError("ONNX export needs onnx and onnxscript: pip install 'tl[export]'") from None
    import tempfile

    batch = torch.export.Dim("batch", min=1, max=4096)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        target = os.path.join(tmp, "model.onnx")
        # external_data=False: one self-contained file (the 2 GiB protobuf limit is far above these models).
        torch.onnx.export(model, (example,), target, input_names=["images"], output_names=["probabilities"],
                          dynamic_shapes={"images": {0: batch}}, external_data=False, dynamo=True, verbose=False)
        return Path(target).read_bytes()
