"""The CLI's happy paths: validate, inspect, version."""

from conftest import REPO, inspect_rows, tiny_recipe, write_recipe


def test_version(cli):
    code, out = cli("--version")
    assert code == 0 and out.startswith("tl ")


def test_validate_shipped_quickstart(cli):
    code, out = cli("validate", REPO / "recipes" / "quickstart.yaml")
    assert code == 0 and out.strip().endswith(": ok")


def test_inspect_lists_nodes_state_and_frontier(cli, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    code, out = cli("inspect", path)
    assert code == 0, out
    rows = inspect_rows(out)
    assert list(rows) == ["stem.0", "stem.1", "stem.2", "block.0", "block.1", "block.2", "block.3", "block.4",
                          "add", "relu", "pool", "flatten", "dropout", "fc"]
    assert rows["block.1"][5:] == ["frozen", "◀", "frontier"] and rows["stem.2"][5:] == ["frozen", "◀", "frontier"]
    assert rows["block.2"][5:] == ["trainable"] and rows["block.0"][5:] == ["frozen"]
    assert rows["stem.0"][3] == "8×32×32"
    assert "trainable: " in out and "frontier: stem.2, block.1" in out
