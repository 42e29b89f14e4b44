"""The linear-probe fit of `optimizer: auto`: standardised inputs, L-BFGS, L2 chosen on val,
standardisation folded into the saved head."""

import json

import pytest
import torch

from tlcli.model.build import build_network
from tlcli.run.checkpoint import load_checkpoint
from tlcli.data.sources import plan_data
from tlcli.engine.features import featurize
from tlcli.engine.probe import L2_GRID, Probe, standardize
from tlcli.config.schema import Recipe
from tlcli.engine.cache import cached_batches
from tlcli.engine.train import evaluate_epoch, fit
from tlcli.engine.stage import StageForward
from tlcli.engine.precision import FP32

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


def test_restandardising_keeps_what_the_head_computes_on_raw_rows():
    """The refit's rows, standardised anew: the head and the probe's statistics follow them, so
    the head, folded, takes raw rows as before."""
    from tlcli.engine.probe import restandardize

    torch.manual_seed(0)
    raw = torch.randn(60, 5) * torch.tensor([1, 10, 0.1, 5, 3]) + torch.tensor([0, 4, -2, 1, 7])
    train = raw[:30].clone()
    probe = Probe("fc", *standardize([train], []))
    model = torch.nn.Sequential()
    model.add_module("fc", torch.nn.Linear(5, 3))
    rows = (raw - probe.mean) / probe.std  # every row, in the units of the first 30
    with torch.no_grad():
        expected = model.fc(rows)
        restandardize(probe, model.fc, [rows[:20], rows[20:]])  # as the refit passes train and val
        torch.testing.assert_close(rows.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(rows.std(0, unbiased=False), torch.ones(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.fc(rows), expected, atol=1e-4, rtol=1e-4)
        probe.fold(model)
        torch.testing.assert_close(model.fc(raw), expected, atol=1e-4, rtol=1e-4)


def test_pooled_statistics_of_parts_are_those_of_their_concatenation():
    """The refit standardises train and val together without joining them: the pooled mean and
    std must be what `standardize` computes on the joined rows (a constant column's std is 1)."""
    from tlcli.engine.probe import pooled_mean_std

    torch.manual_seed(0)
    rows = torch.randn(70, 4) * torch.tensor([1, 50, 0.01, 0]) + torch.tensor([3, -200, 1, 5])
    joined = rows.clone()
    mean, std = standardize([joined], [])
    pooled = pooled_mean_std([rows[:61], rows[61:], rows[:0]])
    torch.testing.assert_close(pooled[0], mean, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(pooled[1], std, atol=0, rtol=1e-5)
    assert pooled[1][3] == 1


def test_the_refit_holds_no_joined_copy_of_train_and_val(tmp_path, monkeypatch):
    """`cache.memory_mib` bounds the rows held; the refit reads train and val where they lie.
    Every tensor made during the refit is seen (a dispatch mode sees each op's outputs): no
    table of feature rows is as long as train and val together, which a joined copy would be."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from tlcli.engine.stage import StageSetup

    class LongestRows(TorchDispatchMode):
        """The most rows of any (rows, features) tensor an op returns."""
        width, rows = None, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == LongestRows.width:
                    LongestRows.rows = max(LongestRows.rows, t.shape[0])
            return out

    seen = {}
    refit_probe = StageSetup.refit_probe

    def recorded(self, steps):
        (train, *_), _ = self.batches.train_rows.memory
        (val, *_), _ = self.batches.val_rows.memory
        LongestRows.width, seen["train"], seen["joined"] = train.shape[1], len(train), len(train) + len(val)
        with LongestRows():
            return refit_probe(self, steps)

    monkeypatch.setattr(StageSetup, "refit_probe", recorded)
    result = fit(probe_recipe(tmp_path))
    assert json.loads((result.run_dir / "checkpoint.json").read_text())["stages"][0]["refit_rows"] == seen["joined"]
    print(f"longest table of feature rows made during the refit: {LongestRows.rows} rows; "
          f"train {seen['train']}, train + val {seen['joined']}")
    assert seen["train"] <= LongestRows.rows < seen["joined"]  # it sees the train rows standardised in place


def test_auto_fits_a_linear_head_as_a_probe_and_saves_it_folded(tmp_path):
    recipe = probe_recipe(tmp_path, refit=False)  # the head that was scored on val is the one saved
    result = fit(recipe)
    meta = json.loads((result.run_dir / "checkpoint.json").read_text())
    stage = meta["stages"][0]
    assert stage["optimizer"] == "lbfgs" and stage["l2"] in L2_GRID
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # The saved (folded) head on the raw cached features scores exactly what training logged
    # with the standardised features and the unfolded head.
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    prepared.model.load_state_dict(load_checkpoint(result.run_dir).model.net.state_dict())
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data, precision=FP32)
    val = evaluate_epoch(StageForward(prepared, False, torch.device("cpu")), cached_batches(cache, "val", 1024, None), "cpu")
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


def test_the_l2_with_the_best_val_score_is_chosen():
    from tlcli.engine.probe import choose_l2

    scores = {1e-4: {"acc": 0.90, "loss": 0.30}, 1e-3: {"acc": 0.95, "loss": 0.40}, 1e-2: {"acc": 0.95, "loss": 0.35}}
    assert choose_l2(lambda l2: scores[l2]) == 1e-2  # best accuracy, then lowest loss
    scores[1e-4] = {"acc": 0.99, "loss": 0.9}
    assert choose_l2(lambda l2: scores[l2]) == 1e-4


def test_auto_chooses_the_l2_that_scores_best_on_val_of_the_grid(tmp_path):
    """Each grid L2 fitted on its own (weight_decay given: no choice made) scores on val; the
    L2 that `auto` chose must be the best of them, by accuracy then loss."""
    chosen = json.loads((fit(probe_recipe(tmp_path / "auto")).run_dir / "checkpoint.json").read_text())["stages"][0]["l2"]
    scored = []
    for l2 in L2_GRID:
        run = fit(probe_recipe(tmp_path / f"l2-{l2}", weight_decay=l2)).run_dir
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
        scored.append((-last["val_acc"], last["val_loss"], l2))
    assert chosen == min(scored)[2], scored


def test_the_probe_fit_matches_scikit_learns_logistic_regression():
    """tl's probe objective, mean cross-entropy + l2/2 |W|^2 (bias free), is scikit-learn's
    LogisticRegression with C = 1 / (l2 n): on standardised digits both reach the same model."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from tlcli.engine.optim import make_optimizer
    from tlcli.engine.probe import lbfgs_epoch
    from tlcli.config.schema import FineTuneSpec

    x, y = load_digits(return_X_y=True)
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    train = [torch.tensor(x_train, dtype=torch.float32)]
    test = [torch.tensor(x_test, dtype=torch.float32)]
    standardize(train, [test])
    l2 = 1e-3
    head = torch.nn.Linear(64, 10)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)

    class OnFrontier(torch.nn.Module):
        """The trainable part's calling convention: one tensor per frontier entry."""

        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, inputs):
            return self.head(inputs[0])

    optimizer = make_optimizer(FineTuneSpec(optimizer="lbfgs"), list(head.named_parameters()))
    labels = torch.tensor(y_train)
    for _ in range(30):
        lbfgs_epoch(OnFrontier(), train, labels, optimizer, l2, [head.weight])
    ours = head(test[0]).argmax(1).numpy()
    sk = LogisticRegression(C=1 / (l2 * len(y_train)), max_iter=5000, tol=1e-8).fit(train[0].numpy(), y_train)
    theirs = sk.predict(test[0].numpy())
    assert (ours == theirs).mean() >= 0.99
    assert abs((ours == y_test).mean() - (theirs == y_test).mean()) <= 0.005
    np.testing.assert_allclose(head.weight.detach().numpy(), sk.coef_ - sk.coef_.mean(0), atol=0.05)


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_the_cross_validated_probe_scores_each_row_in_its_own_fold_as_scikit_learn_does(l2):
    """`cross_validated` fits every fold at once; each fold, standardised with its own training
    rows and scored on its held-out rows, must agree with scikit-learn fitted fold by fold
    (C = 1 / (l2 n_train)). Digits has constant pixels: the unscaled-constant rule is exercised."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tlcli.engine.probe import cross_validated, fold_of

    x, y = load_digits(return_X_y=True)
    x, y = x[:700], y[:700]
    ours, chosen = cross_validated(torch.tensor(x, dtype=torch.float32), torch.tensor(y), 10, l2_grid=(l2,), seed=3)
    assert chosen == l2
    folds = fold_of(len(y), 5, 3).numpy()
    assert sorted(np.bincount(folds)) == [140] * 5
    right = 0
    for k in range(5):
        train, held = folds != k, folds == k
        scaler = StandardScaler().fit(x[train])
        sk = LogisticRegression(C=1 / (l2 * train.sum()), max_iter=5000, tol=1e-8).fit(scaler.transform(x[train]), y[train])
        right += (sk.predict(scaler.transform(x[held])) == y[held]).sum()
    theirs = right / len(y)
    assert theirs < 0.995  # held-out rows, not the training rows (which it fits to ~1.0)
    assert abs(ours - theirs) <= 3 / len(y), (ours, theirs)


def test_cross_validation_chooses_the_l2_that_generalises():
    """Pure noise features beside two informative ones: the strongest L2 of the grid must beat the
    weakest on held-out rows, and be the one returned."""
    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.cat([y[:, None] + 0.8 * torch.randn(n, 2, generator=g), torch.randn(n, 150, generator=g)], 1)
    from tlcli.engine.probe import cross_validated

    weak, _ = cross_validated(x, y, 2, l2_grid=(1e-6,))
    strong, _ = cross_validated(x, y, 2, l2_grid=(1.0,))
    best, chosen = cross_validated(x, y, 2, l2_grid=(1e-6, 1.0))
    assert strong > weak + 0.05, (strong, weak)
    assert (best, chosen) == (strong, 1.0)


def _objective_gradient(run_dir, recipe, l2: float) -> float:
    """The norm of the gradient, at the saved head, of the probe's objective on train + val
    together (mean cross-entropy + l2/2 |W|^2 on rows standardised with their own statistics)."""
    plan = plan_data(recipe.data)
    prepared = build_network(recipe, plan.class_names)
    prepared.model.load_state_dict(load_checkpoint(run_dir).model.net.state_dict())
    cache = featurize(prepared, plan, torch.device("cpu"), recipe.cache, recipe.data, precision=FP32)
    rows = [b for split in ("train", "val") for b in cached_batches(cache, split, 1024, None)]
    x, y = torch.cat([f[0] for f, _ in rows]).double(), torch.cat([labels for _, labels in rows])
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    head = prepared.model.get_submodule("fc")  # tiny_resnet's head, all that trains above its dropout
    weight = (head.weight.detach().double() * std).requires_grad_()  # the same head, on standardised rows
    bias = (head.bias.detach().double() + head.weight.detach().double() @ mean).requires_grad_()
    loss = torch.nn.functional.cross_entropy((x - mean) / std @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
    loss.backward()
    return float(torch.cat([weight.grad.flatten(), bias.grad]).norm())


def test_the_probe_is_refit_on_train_and_val_at_the_chosen_l2_and_logs_the_fit_before(tmp_path):
    """After choosing its L2 on val, the probe fits again on train + val: the saved head is the
    minimum of that objective, which the fit on train alone is not; metrics.jsonl keeps the
    held-out scores of the fit before the refit, the same as a run without it."""
    refit = fit(probe_recipe(tmp_path / "refit"))
    kept = fit(probe_recipe(tmp_path / "kept", refit=False))
    meta = json.loads((refit.run_dir / "checkpoint.json").read_text())["stages"][0]
    plan = plan_data(probe_recipe(tmp_path / "refit").data)
    assert meta["refit_rows"] == len(plan.splits["train"]) + len(plan.splits["val"])
    assert json.loads((kept.run_dir / "checkpoint.json").read_text())["stages"][0]["refit_rows"] is None
    l2 = meta["l2"]
    on_both = _objective_gradient(refit.run_dir, probe_recipe(tmp_path / "refit"), l2)
    on_train = _objective_gradient(kept.run_dir, probe_recipe(tmp_path / "kept", refit=False), l2)
    print(f"gradient on train + val: refit {on_both:.2e}, fit on train only {on_train:.2e}")
    assert on_both < on_train / 20  # (seen: 1.1e-3 against 6.8e-2; L-BFGS stops at its tolerance)
    logged = [(tmp_path / d / "run" / "metrics.jsonl").read_text() for d in ("refit", "kept")]
    assert logged[0] == logged[1]


def test_a_probe_stage_that_another_follows_is_not_refit(tmp_path):
    """The next stage starts from this head: refitted on val, it would make that stage's val
    scores not held out (tl sweep chose LP-FT runs on such scores)."""
    r = tiny_recipe(tmp_path, freeze={"until": "dropout"}, stages=[
        {"name": "head", "epochs": 2}, {"name": "deeper", "freeze": {"until": "block.1"}, "epochs": 1}])
    del r["fine_tune"]["optimizer"]  # auto: the probe fit for the lone head, adam for the deeper stage
    meta = json.loads((fit(Recipe.model_validate(r)).run_dir / "checkpoint.json").read_text())
    assert [(s["optimizer"], s["refit_rows"]) for s in meta["stages"]] == [("lbfgs", None), ("adam", None)]


def test_under_early_stopping_the_probe_is_not_refit(tmp_path):
    """Early stopping keeps the epoch that scored best on val: that head, fitted without val, is saved."""
    result = fit(probe_recipe(tmp_path, early_stopping={"patience": 2}))
    assert json.loads((result.run_dir / "checkpoint.json").read_text())["stages"][0]["refit_rows"] is None
