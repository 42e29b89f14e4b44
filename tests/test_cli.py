"""The CLI's happy paths: validate, inspect, version."""

from conftest import REPO, tiny_recipe, write_recipe


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
    lines = {line.split("│")[2].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert list(lines) == ["stem.0", "stem.1", "stem.2", "block.0", "block.1", "block.2", "block.3", "block.4",
                               "add", "relu", "pool", "flatten", "dropout", "fc"]
    assert "frozen" in lines["block.1"] and "frontier" in lines["block.1"] and "frontier" in lines["stem.2"]
    assert "trainable" in lines["block.2"] and "frontier" not in lines["block.0"]
    assert "8×16×16" in lines["stem.0"].replace(" ", "") or "8×32×32" in lines["stem.0"].replace(" ", "")
    assert "trainable: " in out and "frontier: stem.2, block.1" in out
