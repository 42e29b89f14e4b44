"""Output that scripts read: whole columns without a terminal, `tl models` with a header, a count
and filters, and `tl validate` answering schema errors without loading torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from conftest import REPO, invoke, make_imagefolder, tiny_recipe, write_recipe


def test_inspect_in_a_pipe_prints_every_cell_whole(tmp_path):
    """Piped, rich cut the columns to `Identi…` and `trainab…`."""
    long = "a_classifier_named_at_such_length_that_a_terminal_table_would_have_to_cut_it"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, head={"layer": "none"}, surgery=[
        {"add": {"name": long, "type": "linear", "inputs": ["dropout"], "n_out": 10}}, {"outputs": [long]}]))
    result = invoke("inspect", recipe)  # the test runner's stdout is not a TTY
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["#", "node", "op", "output", "params", "state"]
    row = next(line for line in lines if long in line)
    assert row.split()[1:4] == [long, "Linear", "10"]
    assert "…" not in result.stdout
    states = {line.split()[5] for line in lines[2:] if line[:1].isdigit()}
    assert states == {"frozen", "trainable"}
    assert row.split()[5:] == ["trainable", "new"]


def test_predict_in_a_pipe_prints_whole_paths(tmp_path):
    root = make_imagefolder(tmp_path / "images", per_class=10)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, data={
        "dataset": None, "limit": None, "imagefolder": str(root), "split": {"val": 0.2, "test": 0.2, "seed": 0}}))
    assert invoke("fit", recipe).exit_code == 0
    deep = tmp_path / ("a_directory_with_a_name_long_enough_to_be_folded_by_a_table" * 2)
    deep.mkdir()
    image = next((root / "a").iterdir())
    (deep / image.name).write_bytes(image.read_bytes())
    result = invoke("predict", tmp_path / "run", deep)
    assert result.exit_code == 0, result.output
    assert str(deep / image.name) in result.stdout.splitlines()[1]


def models(*args: str) -> tuple[int, list[str], str]:
    result = invoke("models", *args)
    return result.exit_code, result.stdout.splitlines(), result.stderr


def test_models_has_a_header_and_a_count():
    code, lines, err = models("resnet18")
    assert code == 0 and lines[0].split() == ["zoo", "model", "offline", "weights", "(base.weights)"]
    assert err.strip() == f"{len(lines) - 1} model(s); offline: the weights are here (or embedded) and need no download"


def test_models_finds_torchvision_resnet18_by_its_plain_name():
    code, lines, _ = models("resnet18")
    assert code == 0 and any(line.split()[:2] == ["torchvision", "resnet18"] for line in lines)
    assert any(line.split()[:2] == ["timm", "resnet18.a1_in1k"] for line in lines)


def test_models_filters_by_zoo_and_by_offline_weights():
    _, every, _ = models("resnet*")
    _, torchvision, _ = models("resnet*", "--zoo", "torchvision")
    assert {line.split()[0] for line in torchvision[1:]} == {"torchvision"}
    _, both, _ = models("resnet*", "--zoo", "torchvision", "--zoo", "timm")
    assert len(torchvision) < len(both) <= len(every)
    _, offline, _ = models("--offline")
    rows = [line.split() for line in offline[1:]]
    assert rows and all(row[2] == "offline" for row in rows)
    assert ["timm", "tf_efficientnet_lite0", "offline", "embedded"] in rows


def test_models_pretrained_leaves_out_the_models_without_weights():
    _, every, _ = models("tiny")
    _, pretrained, _ = models("tiny", "--pretrained")
    assert any(line.startswith("tl ") for line in every)
    assert not any(line.startswith("tl ") for line in pretrained)


def test_models_json_count_matches_its_rows_and_refuses_an_unknown_zoo():
    result = invoke("models", "efficientnet", "--zoo", "timm", "--json")
    answer = json.loads(result.stdout)
    assert answer["count"] == len(answer["models"]) > 0 and {m["zoo"] for m in answer["models"]} == {"timm"}
    result = invoke("models", "--zoo", "keras")
    assert result.exit_code == 2 and "--zoo keras: not one of tl, timm, torchvision" in result.stderr


# --------------------------------------------------------------------------- validate without torch

NO_TORCH = """\
import sys
sys.modules["torch"] = None  # any import of torch now fails
from tlcli.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("verb", ["validate", "inspect"])
def test_schema_errors_answer_without_importing_torch(tmp_path, verb):
    recipe = tiny_recipe(tmp_path, fine_tune={"lr": -1, "optimzer": "adam"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    done = subprocess.run([sys.executable, "-c", NO_TORCH, verb, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{path}:" in done.stderr and "fine_tune.lr" in done.stderr and "did you mean 'optimizer'" in done.stderr


def test_the_graph_check_is_the_first_that_needs_torch(tmp_path):
    """Control: a recipe with a good schema goes on to the graph, which needs torch (so the
    no-torch run above really blocked it)."""
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "validate", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 70 and "import of torch halted" in done.stderr


def test_validate_help_says_which_checks_need_the_model():
    result = invoke("validate", "--help")
    assert "without loading torch" in result.stdout and "builds the model" in result.stdout


# --------------------------------------------------------------------------- progress lines in logs


def test_a_step_across_several_quarters_prints_one_line():
    from tlcli.progress import LineReporter

    stream = io.StringIO()
    with LineReporter(stream).task("fit", 4, "epoch") as task:
        task.advance(3)  # past 1/4, 2/4 and 3/4 at once
        task.advance(1)
    assert [line.split(":")[1].split()[0] for line in stream.getvalue().splitlines()] == ["3/4", "4/4"]
