"""Weights: a state dict read without running code, refused when no model should load it, and hashed by content.

One reader for every tensor file tl loads (a base's `{file: PATH}`, a run's
`model.safetensors`, its resume state, the embedded and downloaded weights):
safetensors, or `torch.load(weights_only=True)`, with the library's errors
turned into one line naming the file. `unsound` finds what loading would
silently convert: integers copied into float parameters, NaN and inf.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from tlcli.errors import TLError, WeightsError


def read_tensors(path: Path, error: type[TLError] = WeightsError, advice: str = "") -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file (never unpickling code). A file that
    cannot be read raises `error` naming it, followed by `advice`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise error(f"{path}: damaged or unreadable safetensors file ({err}){advice}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or code-carrying pickle: the user's file, not our bug
        raise error(f"{path}: cannot load as a weights-only state dict: {err}{advice}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path}: not a state dict of tensors{advice}")
    return obj


def unsound(state: dict[str, torch.Tensor], own: Optional[dict[str, torch.Tensor]] = None) -> list[str]:
    """What no model should load: NaN or inf in a float tensor, and (given the model's own
    state `own`) a tensor whose kind differs from the model's (int64 into a float weight)."""
    found = []
    for name, t in state.items():
        target = own.get(name) if own is not None else None
        if target is not None and (t.is_floating_point() != target.is_floating_point() or t.is_complex()):
            found.append(f"{name} is {str(t.dtype).removeprefix('torch.')}, the model's is "
                         f"{str(target.dtype).removeprefix('torch.')}")
        elif t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            found.append(f"{name} holds NaN or inf")
    return found


def require_sound(state: dict[str, torch.Tensor], own: Optional[dict[str, torch.Tensor]], path: Path,
                  error: type[TLError] = WeightsError, advice: str = "") -> None:
    found = unsound(state, own)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise error(f"{path}: refusing these weights: {found[0]}{more}{advice}")


def hash_tensors(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and bytes), for cache keys and resume pins."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # bf16 and friends have no numpy view; the raw bytes are what matter.
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # hashed in place, no bytes copy
    return h.hexdigest()
