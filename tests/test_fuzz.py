"""Fuzzing recipes through the real CLI, in-process: no input gives a traceback, and every
failure is lines of `file:line: path: message` (or `file: message` for the whole file)."""

import copy
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tlcli.cli import app

from conftest import write_recipe

BASE = {
    "base": {"zoo": "tl", "model": "tiny_resnet", "weights": "none", "input_size": 16},
    "data": {"dataset": "digits", "limit": 100, "split": {"val": 0.1, "test": 0.2, "seed": 0}, "batch_size": 32,
             "num_workers": 0},
    "freeze": {"until": "block.1", "trainable": []},
    "head": {"layer": "auto", "init": "xavier"},
    "fine_tune": {"optimizer": "adam", "lr": 0.01, "epochs": 2, "batch_size": 32, "seed": 0, "layer_lr": {},
                  "weight_decay": 0.0, "schedule": "constant", "warmup_epochs": 0},
    "augment": {"hflip": 0.5, "random_resized_crop": {"scale": [0.5, 1.0]}},
    "cache": {"dir": "CACHE", "dtype": "float32"},
    "output_dir": "RUN",
    "device": "cpu",
}
# Paths worth hitting: every key of BASE, optional sections, and lists of operations.
PATHS = sorted({
    *(f"{k}.{sub}" for k, v in BASE.items() if isinstance(v, dict) for sub in v),
    *BASE, "surgery", "surgery.0.add", "surgery.0.n_out_replace", "surgery.0.n_out_replace.n_out",
    "surgery.0.remove.layer", "stages", "stages.0.freeze.until", "stages.0.fine_tune.lr", "stages.1.augment",
    "input", "input.size", "input.channels", "base.checkpoint", "data.imagefolder", "data.classes",
    "fine_tune.early_stopping", "fine_tune.layer_lr.fc", "augment.color_jitter.hue", "freeze.all_but_last",
    "data.on_bad_image", "cache.memory_mib", "cache.shard_size", "nonsense", "base.nonsense",
})
DELETE = object()
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", ".", "..", "block.1", "fc", "stem", "auto",
                                                                      "cuda", "mps", "none", "embedded", "\x00"]),
    st.text(max_size=12),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=6), scalars, max_size=3),
                   st.just(DELETE))
mutations = st.lists(st.tuples(st.sampled_from(PATHS), values), min_size=1, max_size=4)
LINE = re.compile(r"^error: \S")
RECIPE_LINE = re.compile(r"^error: \S*r\.yaml(:\d+)?: ")  # a recipe problem names the file, and its line if it has one


def mutate(recipe: dict, path: str, value) -> None:
    node, parts = recipe, path.split(".")
    for part in parts[:-1]:
        key = int(part) if part.isdigit() and isinstance(node, list) else part
        if isinstance(node, list):
            while len(node) <= key:
                node.append({})
            if not isinstance(node[key], (dict, list)):
                node[key] = {}
            node = node[key]
        else:
            child = node.get(key)
            if not isinstance(child, (dict, list)):
                child = [] if parts[parts.index(part) + 1].isdigit() else {}
                node[key] = child
            node = child
    last = parts[-1]
    if isinstance(node, list):
        return
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value


def run_commands(text: str, commands=("validate",)) -> list[tuple[int, str]]:
    """Each command on the recipe, in order, while the previous ones succeed; (exit code, output) each."""
    from typer.testing import CliRunner

    results = []
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.yaml"
        path.write_text(text.replace("CACHE", str(Path(tmp) / "cache")).replace("RUN", str(Path(tmp) / "run")))
        os.chdir(tmp)  # a fuzzed relative output_dir or cache dir lands here, not in the repository
        try:
            for command in commands:
                result = CliRunner().invoke(app, [command, str(path)], catch_exceptions=True)
                if result.exception and not isinstance(result.exception, SystemExit):
                    raise AssertionError(f"traceback from `tl {command}` for this recipe:\n{text}") from result.exception
                results.append((result.exit_code, result.output))
                if result.exit_code:
                    break
        finally:
            os.chdir(home)
    return results


def check(text: str, commands=("validate",)) -> None:
    for code, out in run_commands(text, commands):
        assert code in (0, 1), out
        if code == 1:
            lines = [line for line in out.splitlines() if line.strip() and not line.startswith(("warning", "  "))]
            assert lines and all(LINE.match(line) for line in lines), out
            assert all(len(line) < 2000 for line in lines), "an error line the size of a page"


@settings(max_examples=500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations)
def test_fuzzed_recipes_never_give_a_traceback(changes):
    recipe = copy.deepcopy(BASE)
    for path, value in changes:
        mutate(recipe, path, value)
    try:
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=False)
    except yaml.YAMLError:
        return  # not representable as YAML: nothing a user could write
    # A recipe that validates must also fit and evaluate, or fail with located lines.
    check(text, ("validate", "fit", "evaluate"))


def _bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# The nastiest cases met so far, kept as a corpus.
CORPUS = {
    "alias bomb, 9 levels": _bomb(9),
    "alias bomb, 6 levels": _bomb(6),
    "deep nesting": "base: " + "[" * 3000 + "]" * 3000 + "\n",
    "duplicate key": "base: {zoo: tl, model: tiny_resnet, weights: none}\ndata: {dataset: digits}\nbase: {}\noutput_dir: RUN\n",
    "model null": "base: {zoo: tl, model: null, weights: none}\ndata: {dataset: digits}\noutput_dir: RUN\n",
    "huge seed": yaml.safe_dump({**BASE, "fine_tune": {"seed": 10**40}}),
    "n_out 10M": yaml.safe_dump({**BASE, "base": {"zoo": "tl", "model": "simple_cnn", "weights": "none"},
                                 "freeze": {"until": "relu1"},
                                 "surgery": [{"n_out_replace": {"layer": "fc1", "n_out": 10_000_000}}]}),
    "lr inf": yaml.safe_dump({**BASE, "fine_tune": {"lr": float("inf")}}),
    "reversed crop": yaml.safe_dump({**BASE, "augment": {"random_resized_crop": {"scale": [1.0, 0.1]}}}),
    "negative jitter": yaml.safe_dump({**BASE, "augment": {"color_jitter": {"brightness": -1}}}),
    "device mps": yaml.safe_dump({**BASE, "device": "mps"}),
    "device cuda:7": yaml.safe_dump({**BASE, "device": "cuda:7"}),
    "NUL in a path": yaml.safe_dump({**BASE, "data": {"imagefolder": "a\x00b"}}),
    "empty output_dir": yaml.safe_dump({**BASE, "output_dir": ""}),
    "missing base checkpoint": yaml.safe_dump({**BASE, "base": {"checkpoint": "/nonexistent/run"}}),
    "a list": "- 1\n- 2\n",
    "empty file": "",
    "binary junk": "\x01\x02\x03: [\n",
    "tab indentation": "base:\n\tzoo: tl\n",
    "2 MiB": "# " + "x" * (2 << 20) + "\n",
}


@pytest.mark.parametrize("name", CORPUS)
def test_the_corpus_of_nasty_recipes_gives_one_line_each(name):
    (code, out), = run_commands(CORPUS[name])
    assert code == 1 and out.count("\n") >= 1
    assert all(RECIPE_LINE.match(line) for line in out.splitlines()), out
