"""Fit and evaluate: frozen state untouched, checkpoint rebuilds the model, cache == full model."""

import json

import pytest
import torch

from tlcli.run.checkpoint import load_checkpoint
from tlcli.data.sources import plan_data
from tlcli.data.pipeline import ImageLoader
from tlcli.engine.features import featurize
from tlcli.config.schema import Recipe
from tlcli.model.build import build_network
from tlcli.engine.train import fit
from tlcli.engine.precision import FP32

from conftest import tiny_recipe, write_recipe


def _initial_state(recipe: Recipe):
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    frozen = set(prepared.split.frozen_state_names(prepared.model))
    return {k: v.clone() for k, v in prepared.model.state_dict().items()}, frozen


def test_fit_keeps_frozen_state_bit_identical(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, fine_tune={"weight_decay": 0.1, "epochs": 3}))
    before, frozen = _initial_state(recipe)
    assert any("running_mean" in k for k in frozen) and any(k.startswith("block.1.") for k in frozen)
    result = fit(recipe)
    after = load_checkpoint(result.run_dir).model.net.state_dict()
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    changed = [k for k in before if k not in frozen and not torch.equal(before[k], after[k])]
    assert "fc.weight" in changed and "block.3.weight" in changed  # trainable parts did train


def test_fit_writes_metrics_checkpoint_and_plots(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path))
    result = fit(recipe)
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(rows[0])
    meta = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["frontier"] == ["stem.2", "block.1"] and "stem.0" in meta["frozen_modules"]
    assert (result.run_dir / "curves.png").stat().st_size > 1000
    assert Recipe.model_validate(__import__("yaml").safe_load((result.run_dir / "recipe.yaml").read_text())) == recipe


def test_same_seed_same_metrics(tmp_path):
    a = fit(Recipe.model_validate(tiny_recipe(tmp_path / "a")))
    b = fit(Recipe.model_validate(tiny_recipe(tmp_path / "b")))
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in p.read_text().splitlines()]
    assert strip(a.run_dir / "metrics.jsonl") == strip(b.run_dir / "metrics.jsonl")


def test_finished_run_is_not_overwritten_without_force(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    assert cli("fit", path)[0] == 0
    code, out = cli("fit", path)
    assert code == 1 and "already holds a finished run; pass --force" in out
    assert cli("fit", path, "--force")[0] == 0


@pytest.mark.real
@pytest.mark.parametrize("optimizer", ["adam", "auto"])  # auto: the probe fit, its standardisation folded in
def test_head_on_cached_features_equals_full_model_on_raw_images(tmp_path, optimizer):
    """The quickstart's setup on a few digits: cache + head == checkpointed full model."""
    import timm

    from tlcli.model.zoo import load_embedded_lite0

    recipe = Recipe.model_validate(tiny_recipe(
        tmp_path,
        base={"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "input_size": 96},
        data={"limit": 80, "split": {"val": 0.15, "test": 0.25, "seed": 0}},
        freeze={"until": "global_pool"},
        fine_tune={"epochs": 3, "lr": 0.01, "optimizer": optimizer},
    ))
    result = fit(recipe)
    ckpt = load_checkpoint(result.run_dir)

    # Frozen weights and BN statistics equal the embedded pretrained ones, bit for bit.
    pretrained = timm.create_model("tf_efficientnet_lite0")
    load_embedded_lite0(pretrained)
    reference = pretrained.state_dict()
    state = ckpt.model.net.state_dict()
    frozen = [k for k in state if not k.startswith("classifier.")]
    assert len(frozen) == 294 and all(torch.equal(state[k], reference[k]) for k in frozen)

    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    prepared.model.load_state_dict(state)
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data, precision=FP32)
    head = prepared.trainable().eval()
    with torch.no_grad():
        from_cache = torch.cat([head(*f) for f, _ in cache.iterate("test")])
        raw = torch.cat([ckpt.model(x) for x, _ in ImageLoader(plan.splits["test"], ckpt.preprocess, 8, torch.device("cpu"), 0)])
    torch.testing.assert_close(from_cache, raw, atol=1e-4, rtol=0)
