"""The model catalogue: what the zoos offer (tl, timm, torchvision), and which pretrained weights are here offline."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelRow:
    zoo: str
    model: str
    weights: str  # what to write under base.weights
    offline: bool  # pretrained weights are embedded or already in a local cache


def _matches(name: str, pattern: Optional[str]) -> bool:
    if not pattern:
        return True
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return fnmatch.fnmatch(name.lower(), glob.lower())


ZOOS = ("tl", "timm", "torchvision")


def list_models(pattern: Optional[str] = None, zoos: tuple[str, ...] = ZOOS, offline: bool = False,
                pretrained: bool = False) -> list[ModelRow]:
    """The rows of `tl models`: those matching `pattern` in `zoos`; `offline`: only those whose
    weights need no download; `pretrained`: only those with pretrained weights."""
    listers = {"tl": _tl_models, "timm": _timm_models, "torchvision": _torchvision_models}
    rows = [row for zoo in ZOOS if zoo in zoos for row in listers[zoo](pattern)]
    return [r for r in rows if (r.offline or not offline) and (r.weights != "none" or not pretrained)]


def _tl_models(pattern: Optional[str]) -> list[ModelRow]:
    from tlcli.model.zoo import model_names

    # tl's own small models have no pretrained weights: nothing to download, ever.
    return [ModelRow("tl", name, "none", True) for name in model_names("tl") if _matches(name, pattern)]


def _timm_models(pattern: Optional[str]) -> list[ModelRow]:
    import timm

    from tlcli.model.zoo import EMBEDDED_ARCH, in_hub_cache, timm_weights_location

    rows = []
    if _matches(EMBEDDED_ARCH, pattern):
        rows.append(ModelRow("timm", EMBEDDED_ARCH, "embedded", True))
    for name in timm.list_models(pretrained=True):
        if not _matches(name, pattern):
            continue
        repo, filename, _ = timm_weights_location(name)
        rows.append(ModelRow("timm", name, "pretrained", bool(repo) and in_hub_cache(repo, filename)))
    return rows


def _torchvision_models(pattern: Optional[str]) -> list[ModelRow]:
    from torchvision.models import get_model_weights

    from tlcli.model.zoo import hub_checkpoint_path, model_names

    rows = []
    for name in model_names("torchvision"):
        if not _matches(name, pattern):
            continue
        for member in get_model_weights(name):
            here = hub_checkpoint_path(member.url).is_file()
            rows.append(ModelRow("torchvision", name, f"{type(member).__name__}.{member.name}", here))
    return rows
