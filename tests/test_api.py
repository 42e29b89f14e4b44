"""The Python API on its own: the same errors as the CLI (as exceptions with file:line
messages), nothing printed unless asked, a setting tl ignores as a TLWarning, and a run that
evaluates, predicts and exports."""

from __future__ import annotations

import pytest

from conftest import make_imagefolder, tiny_recipe, write_recipe


def test_a_bad_recipe_raises_the_clis_located_problems(tmp_path):
    from tlcli import api

    recipe = tiny_recipe(tmp_path, fine_tune={"lrr": 0.1}, head={"init": "xavierr"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(api.RecipeError) as caught:
        api.load(path)
    lines = str(caught.value).splitlines()
    assert len(caught.value.problems) == 2 == len(lines)
    assert any(line.startswith(f"{path}:") and "fine_tune.lrr: unknown key 'lrr'; did you mean 'lr'?" in line for line in lines)
    assert any("head.init: 'xavierr' is not one of" in line for line in lines)
    with pytest.raises(api.TLError, match="override fine_tune.epochs"):
        api.load(write_recipe(tmp_path / "ok.yaml", tiny_recipe(tmp_path)), ["fine_tune.epochs=-1"])


def test_fit_evaluate_predict_export_print_nothing(tmp_path, capsys):
    from tlcli import api

    folder = make_imagefolder(tmp_path / "images", per_class=10)
    recipe = tiny_recipe(tmp_path, data={"imagefolder": str(folder), "dataset": None, "limit": None})
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    run = api.fit(api.load(write_recipe(tmp_path / "r.yaml", recipe), ["fine_tune.epochs=2"]))
    assert run.path == tmp_path / "run" and run.fit_result.epochs == 2
    metrics = run.evaluate()
    assert 0 <= metrics["accuracy"] <= 1 and metrics["n"] == sum(map(sum, metrics["confusion_matrix"])) > 0
    files = sorted(str(p) for p in (folder / "a").glob("*.png"))[:3]
    predictions = run.predict(files, top_k=2)
    assert [p.path for p in predictions] == files and all(len(p.top) == 2 for p in predictions)
    onnx = run.export(tmp_path / "m.onnx")
    assert onnx.is_file() and (tmp_path / "m.onnx.json").is_file()
    with pytest.raises(api.TLError, match="m.onnx"):
        run.export(tmp_path / "m.onnx")  # a file the user named is never overwritten without force
    assert api.open_run(run.path).evaluate()["accuracy"] == metrics["accuracy"]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_setting_tl_ignores_is_a_python_warning(tmp_path):
    from tlcli import api

    recipe = tiny_recipe(tmp_path, fine_tune={"optimizer": "adam", "momentum": 0.5})
    with pytest.warns(api.TLWarning, match="fine_tune.momentum: ignored"):
        api.load(write_recipe(tmp_path / "r.yaml", recipe))
