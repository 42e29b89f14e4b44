"""An override is read within the same bounds as a recipe file: no value on the command
line can make tl hang, and thousands of overrides are answered at once."""

import pytest

from tlcli.errors import RecipeError
from tlcli.config.reading import parse_recipe

from conftest import run_tl, tiny_recipe, write_recipe

def _alias_bomb(levels: int = 9) -> str:
    """A billion laughs: each level is nine copies of the one before."""
    lines = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "[" + ", ".join(lines) + "]"


def test_an_alias_bomb_in_an_override_value_is_refused_at_once(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    # A subprocess with a deadline: before the fix this never returned.
    done = run_tl("validate", path, f"data.classes={_alias_bomb()}", timeout=120)
    assert done.returncode == 1, done.stderr
    assert "override data.classes: " in done.stderr and "YAML nodes" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value,fragment", [
    ("[" * 80 + "]" * 80, "nested deeper than 64"),
    ('"a\\0b"', "NUL byte"),  # a YAML escape: the NUL is in the parsed value
    ("{a: 1, a: 2}", "duplicate key"),
    ("[unclosed", "VALUE is not YAML"),
])
def test_an_override_value_has_the_recipe_files_bounds(tmp_path, value, fragment):
    recipe = tiny_recipe(tmp_path)
    import yaml

    with pytest.raises(RecipeError) as err:
        parse_recipe(yaml.safe_dump(recipe), "r.yaml", [f"fine_tune.layer_lr={value}"])
    assert fragment in str(err.value) and str(err.value).startswith("override fine_tune.layer_lr")


def test_overrides_over_the_size_bound_are_refused(tmp_path):
    import yaml

    with pytest.raises(RecipeError, match="overrides add up to over 1024 KiB"):
        parse_recipe(yaml.safe_dump(tiny_recipe(tmp_path)), "r.yaml", [f"output_dir={'x' * (1 << 20)}"])


def test_a_seed_over_32_bits_is_refused_from_an_override_too(tmp_path):
    import yaml

    with pytest.raises(RecipeError, match="override fine_tune.seed: .*less than or equal to 4294967295"):
        parse_recipe(yaml.safe_dump(tiny_recipe(tmp_path)), "r.yaml", ["fine_tune.seed=4294967296"])


def test_twenty_thousand_overrides_are_answered_and_all_reported(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    overrides = [f"fine_tune.k{i}=1" for i in range(20_000)]
    # A deadline, not a timing: the quadratic matching took 244 s for these on an idle machine
    # (17 s for 5,000); matching by path takes about 4 s, so even a busy machine is far inside it.
    done = run_tl("validate", path, *overrides, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 20_000 and all(line.startswith("error: override fine_tune.k") for line in lines)
