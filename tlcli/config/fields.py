"""Recipe fields: the strict base every section shares, and the field types it is made of. Imports no torch."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Strict(BaseModel):
    # No inf or nan anywhere: `lr: .inf` validated and then trained to NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `lr: true` as 1.0 and `epochs: yes` as 1: a number field takes numbers only.
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _is_numeric(field.annotation) and _has_boolean(value):
            raise ValueError(f"{str(_has_boolean(value)[0]).lower()} is a boolean; this takes a number")
        return value


def _is_numeric(annotation: Any) -> bool:
    """int or float somewhere in the annotation (through Optional, Union, Annotated, list,
    tuple, dict values), and no bool: the fields a boolean must not silently become."""
    found: set = set()

    def walk(a: Any) -> None:
        if a in (int, float, bool):
            found.add(a)
        elif isinstance(a, type) and issubclass(a, BaseModel):
            return  # a section validates its own fields
        for arg in typing.get_args(a):
            walk(arg)

    walk(annotation)
    return bool(found & {int, float}) and bool not in found


def _has_boolean(value: Any) -> list:
    """[the first boolean] found in a value or inside its lists and mappings, else []."""
    if isinstance(value, bool):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    for item in items:
        found = _has_boolean(item)
        if found:
            return found
    return []


def expand_user(value: Optional[str]) -> Optional[str]:
    # `~` is expanded once, here: the path tl uses and the path it records are then the same
    # (a folder literally named `~` was written while the saved recipe named $HOME).
    return None if value is None else os.path.expanduser(value)


# A path the user writes; `~` means their home directory everywhere tl uses it.
UserPath = Annotated[str, AfterValidator(expand_user)]


def own_directory(value: str, what: str) -> str:
    # '' and '.' would make the working directory (often the recipe's own folder) tl's.
    if value.strip() in ("", ".", "./") or Path(value) == Path("."):
        raise ValueError(f"must name a directory of its own for {what}, not '' or '.'")
    return value


# What `device:` (and `--device`) may say; whether that device is here is checked where it is used.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?|mps"

# Seeds feed numpy's RandomState and torch generators: both take 32-bit-safe values.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The pydantic model an annotation holds (`Optional[X]`, `list[X]`, `Union[X, ...]` -> X), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None
