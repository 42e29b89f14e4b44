"""The recipe-key reference, generated from the schema: every key with its type, default and description. Imports no torch.

The descriptions are the schema's own: a field's `description`, else its
comment (the lines above it, or the comment at its end), and each section's
docstring, so the reference cannot say something the schema does not. `make docs` writes docs/recipe-reference.md;
a test checks that the committed page is exactly what this renders.
"""

from __future__ import annotations

import inspect
import io
import re
import tokenize
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import PydanticUndefined

from tlcli.config.schema import Recipe
from tlcli.config.fields import model_in

_HEADER = """# Recipe keys

Every key a recipe may have, generated from tl's schema (`make docs`); `tests/test_docs.py`
checks that this page is what the schema says. A stage (`stages:`) may override any
`fine_tune` key, and takes `name`, `freeze`, `epochs`, `augment` and `input` of its own.

"""


def render_reference() -> str:
    sections = [_HEADER]
    for prefix, model in _sections(Recipe, ""):
        doc = inspect.getdoc(model) if model.__doc__ and model is not Recipe else ""
        sections.append(f"## `{prefix or 'top level'}`\n\n" + (f"{_first_paragraph(doc)}\n\n" if doc else ""))
        sections.append("| key | type | default | what it is |\n|---|---|---|---|\n")
        comments = field_comments(model)
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            what = field.description or comments.get(name, "")
            sections.append(f"| `{key}` | {_type(field.annotation)}{_bounds(field)} | {_default(field)} | {_cell(what)} |\n")
        sections.append("\n")
    return "".join(sections).rstrip() + "\n"


def documented_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """key -> (type, default, description) as a rendered page shows them."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0].startswith("`") and cells[0] != "key":
            rows[cells[0].strip("`")] = (cells[1], cells[2], cells[3])
    return rows


def documented_defaults(text: str) -> dict[str, str]:
    """key -> the default the page shows, read back from a rendered page."""
    return {key: default for key, (_, default, _) in documented_rows(text).items()}


def schema_defaults() -> dict[str, str]:
    """key -> the schema's default, formatted as the page shows it."""
    return {(f"{prefix}.{name}" if prefix else name): _default(field)
            for prefix, model in _sections(Recipe, "") for name, field in model.model_fields.items()}


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the class's source: the comment lines just above it and the one at its end."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    depth_ok = False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[1] == 4:
                pending.append(text)
            elif found and tok.line.strip().split(":")[0] in found:
                name = tok.line.strip().split(":")[0]
                found[name] = (found[name] + " " + text).strip()
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and re.match(rf"\s{{4}}{re.escape(tok.string)}\s*:", tok.line):
            found[tok.string] = " ".join(pending)
            pending, depth_ok = [], True
        elif tok.type == tokenize.NAME and tok.start[1] == 4:
            pending = []  # a method or decorator: comments above it are not a field's
    return {k: v for k, v in found.items() if k in model.model_fields} if depth_ok else {}


def _sections(model: type[BaseModel], prefix: str):
    """(dotted prefix, section model) of every section, depth first; a stage's fine_tune is
    the recipe's, key for key, and is not listed again."""
    yield prefix, model
    for name, field in model.model_fields.items():
        sub = model_in(field.annotation)
        if sub is None or sub.__name__ == "FineTuneOverride":
            continue
        listed = typing.get_origin(field.annotation) is list
        yield from _sections(sub, (f"{prefix}.{name}" if prefix else name) + ("[]" if listed else ""))


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        parts = [_type(a) for a in typing.get_args(annotation) if a is not type(None)]
        return " \\| ".join(dict.fromkeys(parts)) + (" or null" if type(None) in typing.get_args(annotation) else "")
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin in (list, tuple, dict):
        args = [_type(a) for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"{origin.__name__} of {', '.join(args)}" if args else origin.__name__
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    """The field's numeric bounds, as `(0, 10]`, from its constraints."""
    lo = hi = None
    lo_open = hi_open = False
    for m in field.metadata:
        for attr, is_low, is_open in (("ge", True, False), ("gt", True, True), ("le", False, False), ("lt", False, True)):
            value = getattr(m, attr, None)
            if value is not None:
                if is_low:
                    lo, lo_open = value, is_open
                else:
                    hi, hi_open = value, is_open
    if lo is None and hi is None:
        return ""
    left = ("(" if lo_open else "[") + (_number(lo) if lo is not None else "")
    right = (_number(hi) if hi is not None else "") + (")" if hi_open or hi is None else "]")
    return f", {left}, {right}"


def _number(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default if field.default is not PydanticUndefined else field.default_factory()
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value not in ([], {}, ()) else f"`{value!r}`"


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")
