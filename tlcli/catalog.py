"""Catalogues: the zoos' models (with what is usable offline) and the recipes that ship with tl."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tlcli.errors import TLError, did_you_mean
from tlcli.files import atomic_write, claim_outputs


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


def list_models(pattern: Optional[str] = None) -> list[ModelRow]:
    return [*_tl_models(pattern), *_timm_models(pattern), *_torchvision_models(pattern)]


def _tl_models(pattern: Optional[str]) -> list[ModelRow]:
    from tlcli.models import TL_MODELS

    # tl's own small models have no pretrained weights: nothing to download, ever.
    return [ModelRow("tl", name, "none", True) for name in sorted(TL_MODELS) if _matches(name, pattern)]


def _timm_models(pattern: Optional[str]) -> list[ModelRow]:
    import timm
    from timm.models import get_pretrained_cfg

    from tlcli.zoo import EMBEDDED_ARCH, in_hub_cache

    rows = []
    if _matches(EMBEDDED_ARCH, pattern):
        rows.append(ModelRow("timm", EMBEDDED_ARCH, "embedded", True))
    for name in timm.list_models(pretrained=True):
        if not _matches(name, pattern):
            continue
        cfg = get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None)
        cached = bool(repo) and in_hub_cache(repo, getattr(cfg, "hf_hub_filename", None) or "model.safetensors")
        rows.append(ModelRow("timm", name, "pretrained", cached))
    return rows


def _torchvision_models(pattern: Optional[str]) -> list[ModelRow]:
    import torchvision.models
    from torchvision.models import get_model_weights, list_models as tv_list

    from tlcli.zoo import hub_checkpoint_path

    rows = []
    for name in tv_list(module=torchvision.models):
        if not _matches(name, pattern):
            continue
        for member in get_model_weights(name):
            here = hub_checkpoint_path(member.url).is_file()
            rows.append(ModelRow("torchvision", name, f"{type(member).__name__}.{member.name}", here))
    return rows


# --------------------------------------------------------------------------- recipes


def _recipe_dir() -> Path:
    """The shipped recipes: `recipes/` of the checkout tl is installed from (`make install`
    installs it editable, which is the supported install)."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if not checkout.is_dir():
        raise TLError(f"{checkout}: the shipped recipes are not here; tl is installed from a checkout (make install)")
    return checkout


def shipped_recipes() -> dict[str, str]:
    """name -> the first sentence of its header comment (after the command line): what it is for."""
    return {path.stem: _about(path.read_text(encoding="utf-8")) for path in sorted(_recipe_dir().glob("*.yaml"))}


def _about(text: str) -> str:
    comments = [line.lstrip("#").strip() for line in text.splitlines()[1:] if line.startswith("#")]
    paragraph = []
    for line in comments:
        if line:
            paragraph.append(line)
        elif paragraph:
            break
    sentence = " ".join(paragraph).split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= 110 else sentence[:109].rstrip() + "…"


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    names = list(shipped_recipes())
    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in names:
        raise TLError(f"no shipped recipe '{name}'{did_you_mean(stem, names)}; `tl recipes` lists them")
    target = dest / f"{stem}.yaml" if dest.is_dir() else dest
    claim_outputs([target], force)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, (_recipe_dir() / f"{stem}.yaml").read_bytes())
    return target
