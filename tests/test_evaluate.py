"""Evaluate: the full model on the raw test images, its scores and its files."""

import json

import numpy as np
import pytest

from tlcli.engine.evaluate import score

from conftest import tiny_recipe, write_recipe


def test_score_counts_accuracy_topk_and_per_class():
    logits = np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 3.0, 1.0], [1.0, 0.0, 3.0]])
    y = np.array([0, 1, 0, 2])
    m = score(logits, y, ["a", "b", "c"])
    assert m["n"] == 4 and m["accuracy"] == 0.5  # rows 0 and 3 right
    # The key is top5 whatever the number of classes (scripts read it with jq): with 3
    # classes every label is in the top five.
    assert m["top5"] == 1.0 and not any(k.startswith("top") and k != "top5" for k in m)
    wide = np.eye(7)[[0, 1, 2, 3, 4, 5, 6]] * -1.0  # the true class scores lowest: never in the top 5
    assert score(wide, np.arange(7), list("abcdefg"))["top5"] == 0.0
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_class"]["b"]["precision"] == 0.0 and m["per_class"]["c"]["recall"] == 1.0
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]


def test_evaluate_reports_and_writes_files(tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    assert cli("fit", path)[0] == 0
    code, out = cli("evaluate", tmp_path / "run")
    assert code == 0, out
    assert "test accuracy" in out and "top5" in out
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 40 and set(metrics["per_class"]) == {str(i) for i in range(10)}
    cm = json.loads((tmp_path / "run" / "eval" / "confusion_matrix.json").read_text())
    assert sum(map(sum, cm["matrix"])) == 40
    assert (tmp_path / "run" / "eval" / "confusion_matrix.png").stat().st_size > 1000
    # A recipe names the same run as its directory does.
    code, again = cli("evaluate", path)
    assert code == 0 and again.splitlines()[-2] == out.splitlines()[-2]


def test_evaluate_warns_when_the_data_changed_since_fit(tmp_path, cli):
    from conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "imgs", per_class=10)
    recipe = tiny_recipe(tmp_path, fine_tune={"epochs": 1})
    recipe["data"] = {"imagefolder": str(root), "split": {"val": 0.1, "test": 0.2}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli("fit", path)[0] == 0
    victim = sorted((root / "a").iterdir())[0]
    victim.write_bytes(sorted((root / "b").iterdir())[0].read_bytes())
    code, out = cli("evaluate", path)
    assert code == 0 and "warning: the data set has changed since this run was fit" in out


def test_evaluate_scores_from_the_cache_and_matches_the_raw_images(tmp_path):
    """When the test split's cache matches the model's key, evaluate reads it instead of
    decoding and running the frozen part again; the scores are the same either way."""
    import shutil

    from tlcli.engine.evaluate import evaluate
    from tlcli.config.schema import Recipe
    from tlcli.engine.train import fit

    import torch

    from tlcli.run.checkpoint import load_checkpoint
    from tlcli.data.sources import plan_data
    from tlcli.engine.inference import cached_logits, model_logits
    from tlcli.progress import Reporter

    recipe = Recipe.model_validate(tiny_recipe(tmp_path))
    result = fit(recipe)
    ckpt, plan, cpu = load_checkpoint(result.run_dir), plan_data(recipe.data), torch.device("cpu")
    cached = cached_logits(ckpt, plan, recipe.cache, cpu)
    logits, labels = cached.logits, cached.labels
    raw = model_logits(ckpt, plan.splits["test"], 8, 0, cpu, Reporter())
    raw_logits, raw_labels = raw.logits, raw.labels
    assert (labels == raw_labels).all()
    torch.testing.assert_close(torch.from_numpy(logits), torch.from_numpy(raw_logits), atol=1e-4, rtol=0)

    from_cache = evaluate(result.run_dir)
    shutil.rmtree(tmp_path / "cache")
    from_images = evaluate(result.run_dir)
    assert (from_cache.source, from_images.source) == ("cache", "images")
    assert from_cache.metrics["confusion_matrix"] == from_images.metrics["confusion_matrix"]
