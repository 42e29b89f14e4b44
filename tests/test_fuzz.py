"""Fuzzing recipes through the real CLI, in-process. Valid recipes are mutated one typed field
at a time — in the file, or as a KEY=VALUE override — with values drawn from the field's own
type and bounds: in range, at the edges, past them, of the wrong type. Enough stay valid that
a third or more reach fit and evaluate. The contract: no traceback, ever; every failure is
`error:` lines, each located (`FILE:LINE:` or `override KEY:`) and naming a dotted path.

The seed changes every run and is printed (TL_FUZZ_SEED=N replays one; TL_FUZZ_CASES=N runs
more); a failure prints the recipe and the override to add to the corpus below."""

import copy
import math
import os
import random
import re
import tempfile
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml

from tlcli.config.fields import model_in
from tlcli.config.schema import Recipe

from conftest import invoke

CASES = int(os.environ.get("TL_FUZZ_CASES", "120"))

HEAD = {
    "base": {"zoo": "tl", "model": "tiny_resnet", "weights": "none", "input_size": 16},
    "data": {"dataset": "digits", "limit": 100, "split": {"val": 0.1, "test": 0.2, "seed": 0}, "batch_size": 32,
             "num_workers": 0},
    "freeze": {"until": "block.1"},
    "head": {"layer": "auto", "init": "xavier"},
    "fine_tune": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32, "seed": 0},
    "cache": {"dir": "CACHE"},
    "output_dir": "RUN",
    "device": "cpu",
}
TWO_STAGE = {
    **HEAD,
    "stages": [{"name": "head", "epochs": 1},
               {"name": "deeper", "freeze": {"until": "stem"}, "epochs": 1, "fine_tune": {"lr": 0.001},
                "augment": {"hflip": 0.5, "random_resized_crop": {"scale": [0.5, 1.0]}}}],
}
SURGERY = {
    **HEAD,
    "base": {"zoo": "tl", "model": "simple_cnn", "weights": "none"},
    "freeze": {"until": "relu1"},
    "surgery": [{"n_out_replace": {"layer": "fc1", "n_out": 32}},
                {"add": {"name": "extra", "type": "dropout", "p": 0.1, "inputs": ["relu3"]}}],
}
BASES = {"head": HEAD, "two-stage": TWO_STAGE, "surgery": SURGERY}
NODES = ["stem", "stem.0", "stem.2", "block", "block.0", "block.1", "pool", "flatten", "fc", "relu1", "conv2", "fc1",
         "relu3", "dropout"]

# Valid values are drawn from these ranges where the schema's own would make a fit slow.
CHEAP = {"epochs": (1, 3), "batch_size": (1, 64), "limit": (30, 150), "input_size": (8, 32), "size": (8, 32),
         "shard_size": (1, 200), "memory_mib": (0, 64), "step_epochs": (1, 4), "patience": (1, 3),
         "num_workers": (0, 1), "warmup_epochs": (0, 0.5), "n_out": (1, 64), "timeout_s": (10, 60),
         "all_but_last": (0, 4)}
# Values that would reach the network or the GPU: not what this fuzz is about.
OFFLINE = {"dataset": ["digits"], "zoo": ["tl", "timm", "torchvision"], "model": ["tiny_resnet", "simple_cnn"],
           "name": ["none", "embedded"], "device": ["cpu", "auto"]}
LOCATED = re.compile(r"^error: (\S*r\.yaml(:\d+)?|override (?P<key>[^\s:]+)): (?P<path>[A-Za-z_][\w.]*: )?")


# --------------------------------------------------------------------------- the schema's fields


def fields(model=Recipe, prefix=()):
    """(dotted path, annotation, constraints) of every leaf field a recipe has."""
    for name, f in model.model_fields.items():
        sub = model_in(f.annotation)
        if sub is not None and typing.get_origin(f.annotation) is not list:
            yield from fields(sub, (*prefix, name))
        else:
            yield (*prefix, name), f.annotation, f.metadata


LEAVES = [leaf for leaf in fields() if leaf[0][0] not in ("surgery", "stages")]
STAGE_LEAVES = [(("stages", 1, *path), ann, meta) for path, ann, meta in
                [(("epochs",), int, [at.Ge(1)]), (("input",), typing.Literal["auto", "cache", "images"], []),
                 (("freeze", "until"), str, []), (("name",), str, [])]] + \
               [(("stages", 1, "fine_tune", *path[1:]), ann, meta) for path, ann, meta in LEAVES if path[0] == "fine_tune"]
SURGERY_LEAVES = [(("surgery", 0, "n_out_replace", "n_out"), int, [at.Ge(1)]),
                  (("surgery", 0, "n_out_replace", "layer"), str, []),
                  (("surgery", 1, "add", "p"), float, [at.Ge(0), at.Lt(1)]),
                  (("surgery", 1, "add", "type"), typing.Literal["dropout", "activation", "flatten"], []),
                  (("surgery", 1, "add", "inputs"), list[str], [])]


def _bounds(meta):
    lo = hi = None
    lo_open = hi_open = False
    for m in meta:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
    return lo, lo_open, hi, hi_open


def _kinds(annotation):
    found = set()

    def walk(a):
        origin = typing.get_origin(a)
        if origin is typing.Literal:
            found.add(("literal", typing.get_args(a)))
        elif a in (int, float, bool, str):
            found.add(a)
        elif origin in (list, tuple, dict):
            found.add(origin)
        for arg in typing.get_args(a):
            if origin is not typing.Literal:
                walk(arg)

    walk(annotation)
    return found


def draw(rng: random.Random, path: tuple, annotation, meta):
    """A value for the field: valid (in its cheap range) about half the time, else a near miss."""
    name = str(path[-1])
    kinds = _kinds(annotation)
    lo, lo_open, hi, hi_open = _bounds(meta)
    valid = rng.random() < 0.55
    literal = next((k[1] for k in kinds if isinstance(k, tuple)), None)
    if name in OFFLINE and valid:
        return rng.choice(OFFLINE[name])
    if literal is not None and (valid or rng.random() < 0.5):
        choice = rng.choice(literal)
        return choice if valid else f"{choice}x"
    if int in kinds or float in kinds:
        cheap = CHEAP.get(name)
        low = cheap[0] if cheap else (lo if lo is not None else 0)
        high = cheap[1] if cheap else (hi if hi is not None else 10)
        if float in kinds and int not in kinds:
            if valid:
                value = rng.uniform(low, high)
                return value if not ((lo_open and value <= lo) or (hi_open and value >= hi)) else (low + high) / 2
            return rng.choice([v for v in (lo, hi, -1.0, 1e40, math.inf, math.nan, True, "0.1x", [0.1]) if v is not None])
        if valid:
            return rng.randint(int(math.ceil(low)) + (1 if lo_open and low == lo else 0), int(high))
        edge = [lo - 1 if lo is not None else None, hi + 1 if hi is not None else None]
        return rng.choice([v for v in (*edge, 10**40, -(2**63), 2.5, True, "three", None) if v is not None])
    if bool in kinds:
        return rng.random() < 0.5 if valid else rng.choice(["yes", 2, None, [True]])
    if list in kinds or tuple in kinds:
        if "scale" in name or "ratio" in name:
            return sorted([rng.uniform(0.1, 1.0), rng.uniform(0.1, 1.0)]) if valid else rng.choice([[1.0, 0.1], [0.5], "x"])
        return [rng.choice(NODES)] if valid else rng.choice([[], "fc", [1, 2], [None]])
    if dict in kinds:
        return {rng.choice(NODES): rng.uniform(1e-4, 0.1)} if valid else rng.choice([{"fc": -1}, {"nope": 0.1}, [1], "x"])
    if str in kinds:
        if name in ("until", "layer", "trainable") or "layer" in name:
            return rng.choice(NODES) if valid else rng.choice(["blok.1", "", "fc.", "stem.99"])
        return rng.choice(["x", "runs/a", "head2"]) if valid else rng.choice(["", "\x00", 7, ".", None])
    return None


def mutated(rng: random.Random):
    """(base name, recipe text, overrides, mutated path) for one case."""
    base = rng.choice(list(BASES))
    recipe = copy.deepcopy(BASES[base])
    leaves = LEAVES + (STAGE_LEAVES if base == "two-stage" else SURGERY_LEAVES if base == "surgery" else [])
    path, annotation, meta = rng.choice(leaves)
    value = draw(rng, path, annotation, meta)
    if path[-1] in ("dir", "output_dir") and isinstance(value, str) and value.startswith("runs"):
        value = "RUN2" if path[-1] == "output_dir" else "CACHE2"
    overrides = []
    if rng.random() < 0.4:
        overrides = [f"{'.'.join(map(str, path))}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    else:
        node = recipe
        for part in path[:-1]:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}  # `weights: none` written out as `{name: ...}`, a missing section made
            node = node[part]
        node[path[-1]] = value
    return base, yaml.safe_dump(recipe, sort_keys=False), overrides, ".".join(map(str, path))


# --------------------------------------------------------------------------- running


def run_commands(text: str, overrides=(), commands=("validate", "fit", "evaluate"), context: str = "") -> list[tuple[str, int, str]]:
    """Each command on the recipe while the previous ones succeed: (command, exit code, output).
    `context` (the seed and case that made the recipe) goes into the message of a traceback."""
    results = []
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        for word in ("CACHE2", "CACHE", "RUN2", "RUN"):
            text = text.replace(word, str(Path(tmp) / word.lower()))
        path.write_text(text)
        os.chdir(tmp)  # a fuzzed relative output_dir or cache dir lands here, not in the repository
        try:
            for command in commands:
                args = [command, str(path), *overrides] if command != "evaluate" else [command, str(path), *overrides]
                try:
                    result = invoke(*args)
                except Exception as err:  # noqa: BLE001 - any traceback is the finding
                    raise AssertionError(f"traceback from `tl {command}` for this recipe and {overrides}:\n{text}\n{context}") from err
                results.append((command, result.exit_code, result.output))
                if result.exit_code:
                    break
        finally:
            os.chdir(home)
    return results


def check_errors(out: str, context: str) -> None:
    """The contract for a failure: `error:` lines, each located and naming a dotted path."""
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert lines, f"exit 1 with no error line\n{context}\n{out}"
    for line in lines:
        m = LOCATED.match(line)
        assert m, f"an error line without FILE:LINE: or override KEY:\n{line}\n{context}"
        assert m.group("path") or m.group("key"), f"an error line naming no dotted path\n{line}\n{context}"
        assert len(line) < 2000, "an error line the size of a page"


@pytest.mark.slow
def test_fuzzed_recipes_reach_the_engine_and_never_give_a_traceback(capsys):
    seed = int(os.environ.get("TL_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    reached_fit = failed = 0
    for case in range(CASES):
        base, text, overrides, path = mutated(rng)
        context = f"fuzz seed {seed}, case {case} ({base}, {path}); overrides {overrides}; recipe:\n{text}"
        results = run_commands(text, overrides, context=context)
        for command, code, out in results:
            assert code in (0, 1), f"`tl {command}` exited {code}\n{context}\n{out}"
            if code == 1:
                failed += 1
                check_errors(out, context)
        reached_fit += any(command == "fit" for command, _, _ in results)
    with capsys.disabled():
        print(f"\nfuzz (seed {seed}): {CASES} cases, {reached_fit} reached fit; {failed} commands exited 1, each "
              "with located errors; 0 tracebacks")
    assert reached_fit >= CASES / 3, f"only {reached_fit} of {CASES} cases reached fit (seed {seed})"


# --------------------------------------------------------------------------- the corpus


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _with(**changes) -> str:
    recipe = copy.deepcopy(HEAD)
    for dotted, value in changes.items():
        node, parts = recipe, dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return yaml.safe_dump(recipe, sort_keys=False)


# The nastiest cases met so far, kept as a corpus: each is refused in exactly one line.
CORPUS = {
    "alias bomb, 9 levels": _bomb(9),
    "alias bomb, 6 levels": _bomb(6),
    "deep nesting": "base: " + "[" * 3000 + "]" * 3000 + "\n",
    "duplicate key": "base: {zoo: tl, model: tiny_resnet, weights: none}\ndata: {dataset: digits}\nbase: {}\noutput_dir: RUN\n",
    "model null": "base: {zoo: tl, model: null, weights: none}\ndata: {dataset: digits}\noutput_dir: RUN\n",
    "huge seed": _with(fine_tune__seed=10**40),
    "n_out 10M": yaml.safe_dump({**SURGERY, "surgery": [{"n_out_replace": {"layer": "fc1", "n_out": 100_000_000}}]}),
    "lr inf": _with(fine_tune__lr=float("inf")),
    "lr true": _with(fine_tune__lr=True),
    "reversed crop": _with(augment__random_resized_crop__scale=[1.0, 0.1]),
    "negative jitter": _with(augment__color_jitter__brightness=-1),
    "device mps": _with(device="mps"),
    "device cuda:7": _with(device="cuda:7"),
    "NUL in a path": _with(data__imagefolder="a\x00b", data__dataset=None),
    "empty output_dir": _with(output_dir=""),
    "empty cache dir": _with(cache__dir=""),
    "missing base checkpoint": yaml.safe_dump({**HEAD, "base": {"checkpoint": "/nonexistent/run"}}),
    "pooling larger than its map": yaml.safe_dump({**HEAD, "surgery": [
        {"add": {"name": "p", "type": "pooling", "pool": "max", "kernel": 64, "inputs": ["block.1"]}}]}),
    "mirror without sha256": _with(data__dataset="flowers", data__limit=None, data__url="https://mirror.example/f.tgz"),
    "a list": "- 1\n- 2\n",
    "empty file": "",
    "binary junk": "\x01\x02\x03: [\n",
    "tab indentation": "base:\n\tzoo: tl\n",
    "2 MiB": "# " + "x" * (2 << 20) + "\n",
}
OVERRIDE_CORPUS = {
    "alias bomb in a value": ["data.classes=" + "[" + ", ".join(
        ["&l0 [x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "]"],
    "boolean lr": ["fine_tune.lr=true"],
    "index past a list": ["stages.3.epochs=2"],
    "not KEY=VALUE": ["fine_tune.lr"],
    "unclosed value": ["fine_tune.layer_lr={fc: 0.1"],
}


@pytest.mark.parametrize("name", CORPUS)
def test_the_corpus_of_nasty_recipes_gives_one_line_each(name):
    ((_, code, out),) = run_commands(CORPUS[name], commands=("validate",))
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 1, out
    assert re.match(r"^error: \S*r\.yaml(:\d+)?: ", lines[0]), out


@pytest.mark.parametrize("name", OVERRIDE_CORPUS)
def test_the_corpus_of_nasty_overrides_gives_one_line_each(name):
    ((_, code, out),) = run_commands(yaml.safe_dump(HEAD), OVERRIDE_CORPUS[name], commands=("validate",))
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 1, out
    assert lines[0].startswith("error: override "), out
