"""The shipped recipes: list them with what each is for, and copy one to start from. Imports no torch."""

from __future__ import annotations

from pathlib import Path

from tlcli.errors import TLError, did_you_mean
from tlcli.files import atomic_write, claim_outputs


def _recipe_dir() -> Path:
    """The shipped recipes: package data of tlcli (`tlcli/recipes`, in a checkout a link to the
    top-level `recipes/`), so that a wheel installed anywhere has them too."""
    from importlib.resources import files

    shipped = Path(str(files("tlcli") / "recipes"))
    if not shipped.is_dir() or not any(shipped.glob("*.yaml")):
        raise TLError(f"{shipped}: the shipped recipes are missing from this installation of tl; reinstall it")
    return shipped


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
