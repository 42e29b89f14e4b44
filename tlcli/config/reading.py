"""Reading a recipe: YAML within bounds, KEY=VALUE overrides, the schema's errors as lines. Imports no torch.

Validation gathers every problem at once and reports each as
`recipe.yaml:LINE: dotted.path: message`. Line numbers come from the YAML
node tree, so a problem points at the key the user wrote (or, for a missing
key, at the section that lacks it). Every override value is read within the
same bounds as the file.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import ValidationError

from tlcli.config.fields import model_in
from tlcli.config.schema import Recipe
from tlcli.config.source import RecipeSource
from tlcli.config.stages import stage_problems
from tlcli.errors import Problem, RecipeError, TLError, did_you_mean
from tlcli.text import shortened


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, parse and validate a recipe, with `KEY=VALUE` overrides applied; raise
    `TLError`/`RecipeError` for the user."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TLError(f"{path}: recipe file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise TLError(f"{path}: cannot read recipe: {err}") from None
    return parse_recipe(text, name=str(path), overrides=overrides)


# A recipe is a page of YAML. These bounds refuse, quickly and in one line, a file
# that is not one: an alias bomb ("billion laughs") or nesting that would take
# minutes, gigabytes or Python's recursion limit to expand.
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 64


def _walk_nodes(root: yaml.Node, name: str) -> list[Problem]:
    """Count nodes as they would expand (aliases included) and check each mapping's keys once.

    Raises at the first bound crossed; returns duplicate keys (at their second copy) and
    strings with NUL bytes as problems, each at its dotted path."""
    problems, count, seen_maps = [], 0, set()
    stack: list[tuple[yaml.Node, int, tuple]] = [(root, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise RecipeError([Problem(name, None, "", f"the recipe expands to more than {MAX_NODES:,} YAML nodes "
                                                       "(aliases included); refusing to read it")])
        if depth > MAX_DEPTH:
            raise RecipeError([Problem(name, node.start_mark.line + 1, "", f"YAML nested deeper than {MAX_DEPTH} levels")])
        if isinstance(node, yaml.ScalarNode):
            if "\x00" in str(node.value):
                problems.append(Problem(name, node.start_mark.line + 1, _dotted(path), "a NUL byte in a value"))
        elif isinstance(node, yaml.MappingNode):
            if id(node) not in seen_maps:  # an alias repeats a mapping: report its keys once
                seen_maps.add(id(node))
                problems.extend(_duplicate_keys(node, name, path))
            for key, value in node.value:
                here = (*path, key.value if isinstance(key, yaml.ScalarNode) else "?")
                stack.extend(((key, depth + 1, here), (value, depth + 1, here)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1, (*path, i)) for i, child in enumerate(node.value))
    return problems


def _dotted(path: tuple) -> str:
    return ".".join(shortened(str(p), 40) for p in path)


def _duplicate_keys(node: yaml.MappingNode, name: str, path: tuple) -> list[Problem]:
    first: dict[str, int] = {}
    problems = []
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        line = key.start_mark.line + 1
        if key.value in first:
            problems.append(Problem(name, line, _dotted((*path, key.value)), f"duplicate key (first given at line "
                                                                             f"{first[key.value]}); YAML would silently keep this one"))
        else:
            first[key.value] = line
    return problems


def _read_yaml(text: str, name: str) -> tuple[Optional[yaml.Node], Any]:
    """The node tree and the data of one YAML document, within the recipe's bounds (size,
    nodes after aliases, depth, NUL bytes, duplicate keys): a recipe file and every
    override value go through here, so no input can take minutes or gigabytes to read."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError([Problem(name, None, "", f"over {MAX_RECIPE_BYTES // 1024} KiB; refusing to read it")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        problems = _walk_nodes(root, name) if root is not None else []
        if problems:
            raise RecipeError(problems)
        return root, yaml.safe_load(text)
    except RecursionError:
        raise RecipeError([Problem(name, None, "", f"YAML nested deeper than {MAX_DEPTH} levels")]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError([Problem(name, line, "", f"YAML syntax error: {err.problem or err}")]) from None
    except yaml.YAMLError as err:  # e.g. a reader error: a control character in the file
        position = getattr(err, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else None
        raise RecipeError([Problem(name, line, "", f"YAML error: {str(err).splitlines()[0]}")]) from None


def _bounded_yaml(value: str, name: str) -> Any:
    """An override's VALUE, parsed as YAML within the same bounds as a recipe file; no line numbers."""
    if not value.strip():
        return None
    try:
        return _read_yaml(value, name)[1]
    except RecipeError as err:
        raise RecipeError([Problem(p.file, None, p.path, p.message.replace("YAML syntax error", "VALUE is not YAML")
                                   .replace("YAML error", "VALUE is not YAML")) for p in err.problems]) from None


def parse_recipe(text: str, name: str = "recipe.yaml", overrides: Sequence[str] = ()) -> Recipe:
    root, data = _read_yaml(text, name)
    if not isinstance(data, dict):
        raise RecipeError([Problem(name, 1, "", "a recipe is a YAML mapping with base, data, output_dir, ...")])
    source = RecipeSource(name, root, apply_overrides(data, overrides))
    base = data.get("base")
    # zoo, model and weights are required unless base is a checkpoint; pydantic
    # can't say so per key, so check the raw mapping (alongside its errors).
    missing = [
        source.problem(("base", key), "required key is missing (or give checkpoint: RUN_DIR)" if key not in base
                       else "must not be null (or give checkpoint: RUN_DIR)")
        for key in ("zoo", "model", "weights")
        if isinstance(base, dict) and base.get("checkpoint") is None and base.get(key) is None
    ]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        problems = _problems(err, source) + missing
        problems.sort(key=_reading_order)
        raise RecipeError(problems) from None
    if missing:
        raise RecipeError(missing)
    recipe._source = source
    problems = stage_problems(recipe)
    if problems:
        raise RecipeError(problems)
    return recipe


# pydantic names the member of a Union that failed inside the location ("constrained-int",
# "literal['auto']", "function-after[...]", "list[str]"): not a key the user wrote.
_UNION_TAG = re.compile(r"[\[\]()\-]|^(int|float|str|bool|list|dict|tuple|none|json-or-python)$")


def _problems(err: ValidationError, source: RecipeSource) -> list[Problem]:
    merged: dict[tuple, list[str]] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.search(p)))
        merged.setdefault(loc, [])
        message = _message(e, loc)
        if message not in merged[loc]:
            merged[loc].append(message)
    # A value no member of a Union takes fails once per member: one line, its reasons joined.
    problems = [source.problem(loc, "; or ".join(messages)) for loc, messages in merged.items()]
    problems.sort(key=_reading_order)
    return problems


def _message(e: dict, loc: tuple) -> str:
    """One pydantic error as a sentence for the user (`loc`: where, union tags removed)."""
    kind = e["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        fields = _field_names(loc[:-1])
        message = f"unknown key '{key}'{did_you_mean(key, fields)}"
        return message if did_you_mean(key, fields) else message + f" (expected one of: {', '.join(fields)})"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        choices = _literal_choices(loc)
        return f"{e['input']!r} is not one of {', '.join(choices)}{did_you_mean(str(e['input']), choices)}"
    if kind == "value_error":
        return str(e["ctx"].get("error", e["msg"]))
    return e["msg"]


def _reading_order(problem: Problem) -> tuple:
    """The file's problems by line, then the command line's overrides."""
    return (problem.line is None, problem.line or 0, problem.path)


def _annotation_at(loc: tuple) -> Any:
    """The type annotation at a dotted path through the Recipe model, or None."""
    annotation: Any = Recipe
    for part in loc:
        model = model_in(annotation)
        if model is None or str(part) not in model.model_fields:
            if isinstance(part, int):
                continue  # a list index: stay on the list's item type
            return None
        annotation = model.model_fields[str(part)].annotation
    return annotation


def _field_names(loc: tuple) -> list[str]:
    model = model_in(_annotation_at(loc))
    return list(model.model_fields) if model else []


def _literal_choices(loc: tuple) -> list[str]:
    annotation = _annotation_at(loc)
    found: list[str] = []

    def walk(a: Any) -> None:
        if typing.get_origin(a) is Literal:
            found.extend(str(x) for x in typing.get_args(a))
        elif typing.get_origin(a) in (Union, types.UnionType, list):  # a list's items: `tracking.to.1`
            for arg in typing.get_args(a):
                walk(arg)

    walk(annotation)
    return found


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults filled in), as saved into a run directory."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict[tuple, str]:
    """Set `a.b.c=VALUE` overrides (torchtune/Hydra style) into the parsed recipe, in order.

    A VALUE parses as YAML (`0.01`, `true`, `[a, b]`, `null`); a number in the key indexes
    a list (`stages.1.fine_tune.lr=1e-4`). Returns each path set, with the key as written,
    so that a problem there names the override. Malformed overrides are all reported at once."""
    problems, paths = [], {}
    total = sum(len(item.encode("utf-8", "surrogateescape")) for item in overrides)
    if total > MAX_RECIPE_BYTES:
        raise RecipeError([Problem("overrides", None, "", f"the overrides add up to over {MAX_RECIPE_BYTES // 1024} KiB; "
                                                          "refusing to read them")])
    for item in overrides:
        key, eq, value = item.partition("=")
        parts = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
        if not eq or not all(str(p) for p in parts):
            problems.append(Problem(f"override {shortened(item)}", None, "",
                                    "expected KEY=VALUE with a dotted KEY, e.g. fine_tune.lr=0.01"))
            continue
        try:
            parsed = _bounded_yaml(value, f"override {key}")
        except RecipeError as err:
            problems.extend(err.problems)
            continue
        error = _set_path(data, parts, parsed)
        if error:
            problems.append(Problem(f"override {key}", None, "", error))
        paths[parts] = key.strip()
    if problems:
        raise RecipeError(problems)
    return paths


def _set_path(data: Any, parts: tuple, value: Any) -> Optional[str]:
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(map(str, parts[:i])) or "the recipe"
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                return f"{where} is a list of {len(node)}; index it with 0..{len(node) - 1}"
        elif not isinstance(node, dict):
            return f"{where} is {node!r}, not a section with keys"
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                if isinstance(parts[i + 1], int):
                    return f"{'.'.join(map(str, parts[: i + 1]))} is not in the recipe: there is no item {parts[i + 1]} to set"
                node[part] = {}
            node = node[part]
    return None


def anchored(recipe: Recipe, cwd: Optional[Path] = None) -> Recipe:
    """The recipe with every path made absolute (against `cwd`, default the working
    directory), as saved into a run: evaluate and resume then work from anywhere."""
    cwd = Path.cwd() if cwd is None else cwd

    def absolute(value: Optional[str]) -> Optional[str]:
        return None if value is None else str((cwd / Path(value).expanduser()).resolve())

    data = recipe.data.model_copy(update={key: absolute(getattr(recipe.data, key))
                                          for key in ("imagefolder", "csv", "jsonl", "root")})
    base = recipe.base.model_copy(update={"checkpoint": absolute(recipe.base.checkpoint)})
    if base.weights is not None and base.weights.file is not None:
        base = base.model_copy(update={"weights": base.weights.model_copy(update={"file": absolute(base.weights.file)})})
    cache = recipe.cache.model_copy(update={"dir": absolute(recipe.cache.dir)})
    return recipe.model_copy(update={"data": data, "base": base, "cache": cache, "output_dir": absolute(recipe.output_dir)})

