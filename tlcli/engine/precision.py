"""Precision: the arithmetic the frozen part and image stages run in, bf16 autocast where the hardware runs it fast, else fp32.

`precision: auto` asks the hardware, never assumes it. bf16 autocast pays off
on CUDA GPUs with bf16 units and on CPUs with AMX or AVX-512 BF16 (on one
2-core Sapphire Rapids machine the bf16 channels_last forward of Lite0 ran
at 128.6 img/s against 43.6 fp32); on a CPU without them it is emulated and
far slower (an AVX2 EPYC: 2.4 img/s bf16 against 21.6 fp32). So `auto` is
bf16 only where the CPU reports `amx_bf16` or `avx512_bf16`, or the GPU
says it supports bf16, and fp32 elsewhere.

What bf16 means, wherever a model runs (featurize, fit, evaluate, predict):
the frozen part runs under bf16 autocast; so does the trainable part of an
image stage, its loss in fp32. A cache stage trains in fp32 on the cached
rows (a probe's L-BFGS needs fp32). Evaluate and predict run the model the
way its last stage trained, from the run's recorded precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from tlcli.errors import SpecError

Name = Literal["fp32", "bf16"]
# /proc/cpuinfo flags of CPUs with native bf16 matrix arithmetic (oneDNN uses them under autocast).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    name: Name
    reason: str  # why this precision, on this machine (said at the start when a recipe asks for auto or bf16)

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self, device: torch.device):
        """bf16 autocast on `device` when this precision is bf16; a no-op otherwise."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)


FP32 = Precision("fp32", "fp32")


def cpu_flags(cpuinfo: Optional[str] = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (its first `flags` line); empty where there is
    none (macOS, Windows): no flags, no bf16 by `auto`."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def resolve_precision(spec: str, device: torch.device, flags: Optional[set[str]] = None,
                      cuda_bf16: Optional[bool] = None) -> Precision:
    """The recipe's `precision` on this device. `flags` (the CPU's) and `cuda_bf16` (whether the
    GPU supports bf16) are read from the machine unless given: tests inject both kinds of CPU."""
    if spec == "fp32":
        return Precision("fp32", "fp32, as the recipe asks")
    if device.type == "cuda":
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if spec == "bf16" and not cuda_bf16:
            raise SpecError([(("precision",), "bf16 asked for, but this GPU has no bf16 arithmetic (use auto or fp32)")])
        if cuda_bf16:
            return Precision("bf16", "bf16 autocast: this GPU supports bf16" + ("" if spec == "bf16" else " (precision: auto)"))
        return Precision("fp32", "fp32: this GPU has no bf16 arithmetic (precision: auto)")
    if device.type != "cpu":
        if spec == "bf16":
            raise SpecError([(("precision",), f"bf16 runs on the CPU or CUDA, not on {device.type} (use auto or fp32)")])
        return Precision("fp32", f"fp32 on {device.type} (precision: auto)")
    found = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if spec == "bf16":
        why = f"this CPU has {', '.join(found)}" if found else \
            "this CPU has neither AMX nor AVX-512 BF16: bf16 is emulated here and slower than fp32"
        return Precision("bf16", f"bf16 autocast, as the recipe asks ({why})")
    if found:
        return Precision("bf16", f"bf16 autocast: this CPU has {', '.join(found)} (precision: auto)")
    return Precision("fp32", "fp32: this CPU has neither AMX nor AVX-512 BF16 (precision: auto)")
