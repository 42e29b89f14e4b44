"""The recipe schema: every shipped recipe validates; problems come all at once with lines."""

import subprocess
import sys

import pytest
import yaml

from tlcli.errors import RecipeError, TLError
from tlcli.config.reading import load_recipe, parse_recipe

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_shipped_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# tl "), "a recipe's first line is the command that runs it"
    assert recipe.output_dir
    if recipe.base.checkpoint is None:
        # Every layer name in the recipe exists in the model's graph (no weights, no data read).
        from tlcli.engine.inspect import validate_recipe

        validate_recipe(path)


GOOD = """\
base:
  zoo: timm
  model: tf_efficientnet_lite0
  weights: embedded
data:
  dataset: digits
output_dir: runs/x
"""


def test_minimal_recipe_fills_defaults():
    r = parse_recipe(GOOD)
    assert r.base.weights.name == "embedded"
    assert r.fine_tune.optimizer == "auto" and r.cache.dtype == "float32" and r.device == "auto"
    assert r.data.num_workers == "auto"


def test_all_problems_reported_at_once_with_lines_and_suggestions():
    text = """\
base:
  zoo: timn
  model: tf_efficientnet_lite0
  weights: embedded
data:
  dataset: digits
  splt: {val: 0.1}
fine_tune:
  lr: -1
  epochz: 3
output_dir: runs/x
"""
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, name="r.yaml")
    lines = str(err.value).splitlines()
    assert lines == [
        "r.yaml:2: base.zoo: 'timn' is not one of timm, torchvision, tl; did you mean 'timm'?",
        "r.yaml:7: data.splt: unknown key 'splt'; did you mean 'split'?",
        "r.yaml:9: fine_tune.lr: Input should be greater than 0",
        "r.yaml:10: fine_tune.epochz: unknown key 'epochz'; did you mean 'epochs'?",
    ]


def test_missing_section_points_at_parent():
    with pytest.raises(RecipeError) as err:
        parse_recipe("base:\n  zoo: timm\n  model: x\ndata:\n  dataset: digits\n", name="r.yaml")
    text = str(err.value)
    assert "r.yaml:1: base.weights: required key is missing" in text
    assert "output_dir: required key is missing" in text


def test_yaml_syntax_error_names_line():
    with pytest.raises(RecipeError) as err:
        parse_recipe("base:\n  zoo: [timm\nfoo: 1\n", name="r.yaml")
    assert str(err.value).startswith("r.yaml:3: YAML syntax error")


def test_weights_forms():
    r = parse_recipe(GOOD.replace("weights: embedded", "weights: {file: w.pt, sha256: " + "a" * 64 + "}"))
    assert r.base.weights.file == "w.pt" and r.base.weights.sha256 == "a" * 64
    with pytest.raises(RecipeError, match="sha256: Value error, must be 64 hexadecimal|must be 64 hexadecimal"):
        parse_recipe(GOOD.replace("weights: embedded", "weights: {file: w.pt, sha256: abc}"))


def test_data_needs_exactly_one_source():
    with pytest.raises(RecipeError, match="data: give exactly one of"):
        parse_recipe(GOOD.replace("dataset: digits", "dataset: digits\n  imagefolder: x"))


def test_nesterov_needs_sgd():
    with pytest.raises(RecipeError, match="nesterov needs optimizer: sgd"):
        parse_recipe(GOOD + "fine_tune: {optimizer: adam, nesterov: true}\n")


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system"])
def test_yaml_is_loaded_safely(tmp_path, tag):
    """A valid recipe whose one value would, under an unsafe loader, run a command that leaves
    a file behind: the file must not appear, and the tag is an error at its line."""
    sentinel = tmp_path / "pwned"
    text = GOOD.replace("output_dir: runs/x", f"output_dir: {tag} ['touch {sentinel}']")
    assert text != GOOD
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: .*python/object"):
        parse_recipe(text)
    assert not sentinel.exists()
    yaml.unsafe_load(text)  # the sentinel works: an unsafe loader would have run it
    assert sentinel.exists()


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(TLError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_schema_and_cli_import_no_torch():
    code = "import sys, tlcli.config.reading, tlcli.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv=['tl','--help']\n"
        "from tlcli.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "featurize" in out.stdout


def test_duplicate_or_single_classes_are_refused_at_their_line():
    text = GOOD.replace("dataset: digits", "dataset: digits\n  classes: [1, 2, 1]")
    with pytest.raises(RecipeError, match=r"r.yaml:7: data.classes: class '1' is listed twice"):
        parse_recipe(text, name="r.yaml")
    with pytest.raises(RecipeError, match="2 or more classes"):
        parse_recipe(GOOD.replace("dataset: digits", "dataset: digits\n  classes: [3]"), name="r.yaml")
