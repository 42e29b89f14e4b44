"""The linear-probe fit of `optimizer: auto`: standardised inputs, L-BFGS, L2 chosen on val,
standardisation folded into the saved head."""

import json

import pytest
import torch

from tlcli.build import prepare
from tlcli.checkpoint import load_checkpoint
from tlcli.data import plan_data
from tlcli.features import featurize
from tlcli.probe import L2_GRID, Probe, standardize
from tlcli.recipe import Recipe
from tlcli.train import cached_batches, run_epoch, StageModel, fit

from conftest import tiny_recipe, write_recipe


def probe_recipe(tmp_path, **fine_tune):
    r = tiny_recipe(tmp_path, freeze={"until": "dropout"}, fine_tune={"epochs": 4, **fine_tune})
    del r["fine_tune"]["optimizer"]  # the default, auto
    return Recipe.model_validate(r)


def test_fold_gives_the_same_outputs_on_raw_features():
    torch.manual_seed(0)
    x = torch.randn(50, 6) * torch.tensor([1, 10, 0.1, 5, 1, 3]) + torch.tensor([0, 4, -2, 1, 0, 7])
    raw = x.clone()
    mean, std = standardize([x], [])
    head = torch.nn.Linear(6, 3)
    with torch.no_grad():
        expected = head(x)
    model = torch.nn.Sequential()
    model.add_module("fc", head)
    Probe("fc", mean, std).fold(model)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(raw), expected, atol=1e-5, rtol=1e-5)


def test_auto_fits_a_linear_head_as_a_probe_and_saves_it_folded(tmp_path):
    recipe = probe_recipe(tmp_path)
    result = fit(recipe)
    meta = json.loads((result.run_dir / "checkpoint.json").read_text())
    stage = meta["stages"][0]
    assert stage["optimizer"] == "lbfgs" and stage["l2"] in L2_GRID
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # The saved (folded) head on the raw cached features scores exactly what training logged
    # with the standardised features and the unfolded head.
    plan = plan_data(recipe.data)
    prepared = prepare(recipe, plan.class_names)
    prepared.model.load_state_dict(load_checkpoint(result.run_dir).model.net.state_dict())
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data)
    val = run_epoch(StageModel(prepared, False, torch.device("cpu")), cached_batches(cache, "val", 1024, None), "cpu")
    assert val["loss"] == pytest.approx(rows[-1]["val_loss"], abs=1e-5)
    assert val["acc"] == rows[-1]["val_acc"]


def test_an_explicit_weight_decay_is_the_probes_l2(tmp_path):
    result = fit(probe_recipe(tmp_path, weight_decay=0.05))
    meta = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert meta["stages"][0]["l2"] == 0.05


def test_auto_uses_adam_when_more_than_a_linear_head_trains(tmp_path):
    r = tiny_recipe(tmp_path, freeze={"until": "stem"}, fine_tune={"epochs": 1})
    del r["fine_tune"]["optimizer"]
    meta = json.loads((fit(Recipe.model_validate(r)).run_dir / "checkpoint.json").read_text())
    assert meta["stages"][0]["optimizer"] == "adam" and meta["stages"][0]["l2"] is None


def test_lbfgs_where_it_cannot_apply_is_a_recipe_error_at_its_line(tmp_path, cli):
    r = tiny_recipe(tmp_path, freeze={"until": "stem"}, fine_tune={"optimizer": "lbfgs", "epochs": 1})
    path = write_recipe(tmp_path / "r.yaml", r)
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "lbfgs" in l)
    code, out = cli("fit", path)
    assert code == 1 and f"{path}:{line}: fine_tune.optimizer: lbfgs fits a single Linear head" in out
