"""Devices: which one a command runs on, and the switches that make it repeat itself.

`auto` is CUDA when there is a GPU, else the CPU; a device that is not here is
the recipe's problem at its `device:` line (or the `--device` option's). Under
torchrun each rank takes `cuda:LOCAL_RANK`. On CUDA, tl sets the switches torch
documents for reproducible results, so that the same seed gives the same
`metrics.jsonl` there as it does on the CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from tlcli.errors import SpecError, TLError


def device_for(recipe, override: Optional[str] = None) -> torch.device:
    """The device a command runs on: the command line's `--device`, else the recipe's; a
    device that is not here is reported where it was asked for (the option, or the line)."""
    if override is None:
        with recipe.located():
            return resolve_device(recipe.device)
    try:
        return resolve_device(override)
    except SpecError as err:
        raise TLError(f"--device {override}: {err.issues[0][1]}") from None


def resolve_device(spec: str, cuda_available: Optional[bool] = None, mps_available: Optional[bool] = None,
                   cuda_count: Optional[int] = None, local_rank: Optional[int] = None) -> torch.device:
    """`auto` picks CUDA when present, else the CPU. A device that is not there is the
    recipe's problem, at its `device:` line. Under torchrun (`local_rank`, read from the
    environment by default), `auto` and `cuda` mean this rank's GPU, `cuda:LOCAL_RANK`."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if local_rank is None:
        from tlcli.engine import distributed

        dist = distributed.current()
        local_rank = dist.local_rank if dist.enabled else None
    if local_rank is not None and spec.startswith("cuda:"):
        # Every rank would take the same GPU. Which GPUs a job uses is CUDA_VISIBLE_DEVICES's to say.
        raise SpecError([(("device",), f"{spec}: under torchrun each rank takes its own GPU, cuda:LOCAL_RANK; "
                                       "write device: cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")])
    if spec in ("auto", "cuda") and cuda_available and local_rank is not None:
        spec = f"cuda:{local_rank}"
    if spec == "auto":
        return torch.device("cuda" if cuda_available else "cpu")
    if spec.startswith("cuda"):
        if not cuda_available:
            raise SpecError([(("device",), f"{spec} asked for, but no CUDA device is available (use device: auto)")])
        count = torch.cuda.device_count() if cuda_count is None else cuda_count
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= count:
            raise SpecError([(("device",), f"{spec} asked for, but this machine has {count} CUDA device(s)")])
    if spec == "mps" and not (torch.backends.mps.is_available() if mps_available is None else mps_available):
        raise SpecError([(("device",), "mps asked for, but Apple's Metal backend is not available here (use device: auto)")])
    return torch.device(spec)


def make_deterministic(device: torch.device) -> None:
    """On CUDA: deterministic cuDNN and cuBLAS kernels (torch's "Reproducibility" notes). The
    CPU kernels tl uses are deterministic already. An op with no deterministic CUDA kernel
    (adaptive average pooling's backward, among others common in timm models) warns instead of
    failing: refusing it would refuse most fine-tunes, so on CUDA the same seed gives the same
    result up to those ops. CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN before use (torch's "Reproducibility"
    # notes: a performance drop), so that a kernel reading memory it never wrote is caught. tl's
    # ops write what they read; the fill would cost a kernel per allocation, every batch.
    torch.utils.deterministic.fill_uninitialized_memory = False


def to_channels_last(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` with its 4-D weights in channels_last, the layout convolutions run fastest in
    (not on MPS). `module.to(memory_format=...)` would also convert every 5-D buffer, which
    channels_last cannot hold (Swin's attention masks): only 4-D tensors are converted."""
    if device.type == "mps":
        return module
    return module._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
