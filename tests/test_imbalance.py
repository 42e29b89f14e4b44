"""Class imbalance: `fine_tune.class_weights` (the loss) and `data.sampler: balanced` (the
draws), on the cache and on images, reproducible like every other epoch; balanced accuracy in
metrics.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import invoke, tiny_recipe, write_recipe

COUNTS = {"a": 40, "b": 8, "c": 4}  # 10:2:1


@pytest.fixture
def folder(tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c, (name, n) in enumerate(COUNTS.items()):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == c)[:n]:
            Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).resize((24, 24)).save(
                tmp_path / "imgs" / name / f"{i}.png")
    return tmp_path / "imgs"


def _recipe(tmp_path, folder, name="r.yaml", **sections):
    recipe = tiny_recipe(tmp_path, **sections)
    recipe["data"] = {**{k: v for k, v in recipe["data"].items() if k not in ("dataset", "limit")},
                      "imagefolder": str(folder), "split": {"val": 0.25, "test": 0.25, "seed": 0},
                      **sections.get("data", {})}
    return write_recipe(tmp_path / name, recipe)


def _ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def test_balanced_class_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    from tlcli.engine.stage import loss_weights

    labels = torch.tensor([0] * 40 + [1] * 8 + [2] * 4)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    np.testing.assert_allclose(loss_weights("balanced", ["a", "b", "c"], labels).numpy(), expected, rtol=1e-6)
    assert loss_weights({"c": 5.0}, ["a", "b", "c"], labels).tolist() == [1.0, 1.0, 5.0]


def test_an_unknown_class_in_class_weights_is_an_error_at_its_line(tmp_path, folder, cli):
    path = _recipe(tmp_path, folder, fine_tune={"class_weights": {"a": 1.0, "cc": 4.0}})
    code, out = cli("validate", str(path))
    assert code == 1, out
    assert "fine_tune.class_weights.cc: unknown class 'cc'; did you mean 'c'?" in out, out


def _epoch_labels(batches) -> list[int]:
    return [int(y) for _, labels in batches for y in labels]


@pytest.mark.parametrize("memory_mib", [0, 512], ids=["from disk", "in memory"])
def test_the_balanced_sampler_draws_every_class_equally_one_shard_at_a_time(tmp_path, folder, memory_mib):
    from tlcli.engine.cache import open_cache
    from tlcli.engine.stage import CacheBatches

    path = _recipe(tmp_path, folder, data={"batch_size": 4}, cache={"shard_size": 8})
    _ok("featurize", path)
    (cache_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and len(p.name) == 24]
    cache = open_cache(cache_dir)
    assert len(cache.shards("train")) > 2
    batches = CacheBatches(cache, torch.device("cpu"), 5, memory_mib, balanced=True)
    rows = cache.count("train")
    drawn = []
    for epoch in range(40):
        epoch_batches = list(batches.train(torch.Generator().manual_seed(epoch)))
        assert len(epoch_batches) == math.ceil(rows / 5) == batches.steps
        assert sum(len(y) for _, y in epoch_batches) == rows
        drawn += _epoch_labels(epoch_batches)
    share = np.bincount(drawn, minlength=3) / len(drawn)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.05)  # the train split is about 10:2:1
    # The same generator gives the same draws, whether the rows are in memory or read a shard at a time.
    other = CacheBatches(cache, torch.device("cpu"), 5, 512 - memory_mib, balanced=True)
    for a, b in zip(batches.train(torch.Generator().manual_seed(7)), other.train(torch.Generator().manual_seed(7))):
        assert torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))


def test_the_balanced_sampler_on_images_draws_every_class_equally():
    from tlcli.engine.stage import ImageBatches

    batches = ImageBatches.__new__(ImageBatches)  # only the epoch's order is under test: nothing decoded
    batches.splits = {"train": [(f"a{i}.png", 0) for i in range(40)] + [(f"b{i}.png", 1) for i in range(4)]}
    batches.rank, batches.world = 0, 1
    labels = batches.train_labels()
    for balanced, expected in ((True, [0.5, 0.5]), (False, [40 / 44, 4 / 44])):
        batches.balanced = balanced
        orders = [batches.epoch_order(torch.Generator().manual_seed(e)) for e in range(50)]
        assert all(len(order) == 44 for order in orders)
        share = np.bincount(labels[sum(orders, [])].numpy(), minlength=2) / (44 * 50)
        np.testing.assert_allclose(share, expected, atol=0.05)
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(44))  # shuffle: each row once


def test_class_weights_and_the_sampler_change_training_and_repeat_exactly(tmp_path, folder):
    rows = {}
    for name, sections in {"plain": {}, "weights": {"fine_tune": {"class_weights": "balanced"}},
                           "sampler": {"data": {"sampler": "balanced"}}}.items():
        for attempt in (1, 2):
            path = _recipe(tmp_path, folder, f"{name}.yaml", output_dir=str(tmp_path / f"run-{name}-{attempt}"),
                           **sections)
            _ok("fit", path)
            rows[name, attempt] = (tmp_path / f"run-{name}-{attempt}" / "metrics.jsonl").read_text()
    for name in ("plain", "weights", "sampler"):
        assert rows[name, 1] == rows[name, 2], f"{name}: two fits of one recipe differ"
    assert len({rows["plain", 1], rows["weights", 1], rows["sampler", 1]}) == 3


def test_the_sampler_on_a_probe_fit_weighs_the_classes_and_says_so(tmp_path, folder):
    head_only = {"freeze": {"until": "dropout"}}  # the lone fc trains: optimizer auto fits it as a probe
    sampled = _recipe(tmp_path, folder, "s.yaml", output_dir=str(tmp_path / "s"), data={"sampler": "balanced"},
                      fine_tune={"optimizer": "auto"}, **head_only)
    weighted = _recipe(tmp_path, folder, "w.yaml", output_dir=str(tmp_path / "w"),
                       fine_tune={"optimizer": "auto", "class_weights": "balanced"}, **head_only)
    out = _ok("fit", sampled)
    assert "data.sampler: balanced: the L-BFGS head fit uses every row each step; it weighs the classes instead" in out
    _ok("fit", weighted)
    plain = _recipe(tmp_path, folder, "p.yaml", output_dir=str(tmp_path / "p"), fine_tune={"optimizer": "auto"},
                    **head_only)
    _ok("fit", plain)
    rows = {name: (tmp_path / name / "metrics.jsonl").read_text() for name in "swp"}
    assert rows["s"] == rows["w"]
    # The weights reach the fit itself, not only the loss it reports: the heads differ.
    from safetensors.torch import load_file

    heads = {name: load_file(tmp_path / name / "model.safetensors")["fc.weight"] for name in "wp"}
    assert not torch.allclose(heads["w"], heads["p"])


def test_metrics_json_has_balanced_accuracy(tmp_path, folder):
    from sklearn.metrics import balanced_accuracy_score

    path = _recipe(tmp_path, folder)
    _ok("fit", path)
    _ok("evaluate", path)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    matrix = np.array(json.loads((tmp_path / "run" / "eval" / "confusion_matrix.json").read_text())["matrix"])
    y = np.repeat(np.arange(3), matrix.sum(1))
    pred = np.concatenate([np.repeat(np.arange(3), row) for row in matrix])
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_balanced_accuracy_is_the_mean_recall_over_the_classes_present():
    from sklearn.metrics import balanced_accuracy_score

    from tlcli.engine.evaluate import score

    y = np.array([0, 0, 0, 1, 1])  # class c absent, as in a small --data folder
    logits = np.eye(3)[[0, 0, 1, 1, 2]]
    metrics = score(logits, y, ["a", "b", "c"])
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, logits.argmax(1)))


class Killed(Exception):
    """Stands for a kill at one exact point of the fit."""


@pytest.mark.parametrize("sections", [{"data": {"sampler": "balanced"}}, {"fine_tune": {"class_weights": "balanced"}}],
                         ids=["sampler", "class weights"])
def test_an_interrupted_imbalanced_fit_resumes_to_the_uninterrupted_weights(tmp_path, folder, monkeypatch, sections):
    import tlcli.engine.train as train
    from safetensors.torch import load_file

    real_save = train.save_epoch

    def dies_at_epoch_two(ctx, setup, stopper, epoch, rows, summaries):
        if epoch == 2:  # epoch 1's resume state is on disk; epoch 2's never will be
            raise Killed()
        return real_save(ctx, setup, stopper, epoch, rows, summaries)

    whole = _recipe(tmp_path, folder, "whole.yaml", output_dir=str(tmp_path / "whole"), **sections)
    _ok("fit", whole)
    cut = _recipe(tmp_path, folder, "cut.yaml", output_dir=str(tmp_path / "cut"), **sections)
    monkeypatch.setattr(train, "save_epoch", dies_at_epoch_two)
    with pytest.raises(Killed):
        invoke("fit", cut)
    monkeypatch.setattr(train, "save_epoch", real_save)
    _ok("fit", cut, "--resume")
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    a, b = load_file(tmp_path / "cut" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
