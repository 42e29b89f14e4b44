"""The documentation holds what the code does: the recipe-key reference is generated from the
schema and current, every default it shows is the schema's, and the shipped pages link up."""

import re

from tlcli.config.reference import documented_defaults, documented_rows, render_reference, schema_defaults

from conftest import REPO


def test_the_recipe_reference_is_the_schemas_and_current():
    page = (REPO / "docs" / "recipe-reference.md").read_text()
    assert page == render_reference(), "docs/recipe-reference.md is stale: run `make docs`"


def test_every_documented_default_is_the_schemas():
    shown = documented_defaults((REPO / "docs" / "recipe-reference.md").read_text())
    actual = schema_defaults()
    assert shown.keys() == actual.keys()
    assert {k: v for k, v in shown.items() if actual[k] != v} == {}
    # Spot checks against the schema objects themselves, not the renderer.
    from tlcli.config.schema import Recipe
    from tlcli.config.training import FineTuneSpec

    assert shown["fine_tune.epochs"] == f"`{FineTuneSpec().epochs}`"
    assert shown["fine_tune.weight_decay"] == f"`{FineTuneSpec().weight_decay}`"
    assert shown["device"] == f"`{Recipe.model_fields['device'].default}`"


def test_every_key_has_a_description():
    rows = documented_rows((REPO / "docs" / "recipe-reference.md").read_text())
    assert len(rows) > 100 and [key for key, (_, _, what) in rows.items() if not what] == []


def test_the_readme_links_only_to_pages_that_exist():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links and [link for link in links if not (REPO / link).is_file()] == []


def yaml_blocks(page: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", page, flags=re.S)


def test_the_recipe_page_shows_the_quickstart_as_shipped():
    page = (REPO / "docs" / "recipes.md").read_text()
    assert (REPO / "recipes" / "quickstart.yaml").read_text() in yaml_blocks(page)


def test_every_yaml_example_in_the_docs_is_a_valid_recipe_part():
    """Each example, laid over the quickstart, passes the schema: a renamed or re-bounded key makes
    its example fail here, not in a user's hands."""
    import yaml

    from tlcli.config.reading import parse_recipe

    base = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    checked = 0
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in yaml_blocks(page.read_text()):
            part = yaml.safe_load(block)
            assert isinstance(part, dict), f"{page.name}: a yaml example that is not a mapping:\n{block}"
            parse_recipe(yaml.safe_dump({**base, **part}), name=f"{page.name} example")
            checked += 1
    assert checked >= 3  # the regex found the examples


def test_the_readmes_first_screen_is_a_guide_in_80_lines():
    """What tl is, the two commands and the walk-through, before any reference."""
    readme = (REPO / "README.md").read_text()
    first = readme[: readme.index("## Read on")]
    assert len(first.splitlines()) <= 80
    for step in ("make demo", "make test", "## Walk-through", "tl predict", "onnxruntime"):
        assert step in first, step
    assert len(readme.encode()) < 12_000, "the README is a guide; the reference lives in docs/"
