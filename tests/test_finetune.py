"""The fine-tune config: optimizers, parameter groups, schedules, smoothing, clipping."""

import json

import pytest
import torch

from tlcli.errors import RecipeError
from tlcli.config.schema import FineTuneSpec, Recipe
from tlcli.config.reading import parse_recipe
from tlcli.engine.optim import lr_factor, make_optimizer
from tlcli.engine.train import fit

from conftest import tiny_recipe


def test_warmup_then_cosine():
    ft = FineTuneSpec(schedule="cosine", warmup_epochs=2, epochs=10)
    assert lr_factor(ft, 0) == 0 and lr_factor(ft, 1) == pytest.approx(0.5)
    assert lr_factor(ft, 2) == pytest.approx(1.0)
    assert lr_factor(ft, 6) == pytest.approx(0.5)
    assert lr_factor(ft, 10) == pytest.approx(0.0, abs=1e-12)


def test_step_and_onecycle_shapes():
    step = FineTuneSpec(schedule="step", step_epochs=3, step_gamma=0.5, epochs=10)
    assert [lr_factor(step, e) for e in (0, 2.9, 3, 6.5)] == [1.0, 1.0, 0.5, 0.25]
    one = FineTuneSpec(schedule="onecycle", epochs=10)
    values = [lr_factor(one, e / 10) for e in range(101)]
    peak = max(range(101), key=values.__getitem__)
    assert values[0] < 0.1 and values[peak] == pytest.approx(1.0) and 25 <= peak <= 35 and values[-1] < 1e-6


def test_warmup_must_fit_in_training():
    with pytest.raises(RecipeError, match="warmup_epochs"):
        parse_recipe("base: {zoo: tl, model: tiny_resnet, weights: none}\ndata: {dataset: digits}\n"
                     "fine_tune: {epochs: 3, warmup_epochs: 3}\noutput_dir: x\n")


@pytest.mark.parametrize("optimizer,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                           ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_norm_and_bias_get_no_weight_decay(optimizer, cls):
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = make_optimizer(FineTuneSpec(optimizer=optimizer, weight_decay=0.1), list(layer.named_parameters()))
    assert isinstance(opt, cls)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    opt = make_optimizer(FineTuneSpec(weight_decay=0.1, decay_norm_and_bias=True), list(layer.named_parameters()))
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4


def test_fit_follows_the_schedule_and_options(tmp_path):
    recipe = Recipe.model_validate(tiny_recipe(tmp_path, fine_tune={
        "epochs": 4, "schedule": "cosine", "warmup_epochs": 1, "lr": 0.01,
        "label_smoothing": 0.1, "grad_clip": 1.0, "optimizer": "sgd", "nesterov": True,
    }))
    rows = [json.loads(l) for l in (fit(recipe).run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.01) and lrs[1] > lrs[2] > lrs[3] > 0
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
