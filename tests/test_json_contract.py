"""`--json`: every way out of every verb prints exactly one JSON object on stdout, with the
exit code of the README's table, whatever happened (success, a user error, a usage error, a
failed gate, a crash, an interrupt)."""

import json

import pytest

from tlcli.cli import EXIT_CODES, main
from tlcli.config.schema import Recipe
from tlcli.engine.train import fit

from conftest import make_imagefolder, tiny_recipe, write_recipe


def _run(capsys, *argv):
    """`tl ARGV` through the real entry point, in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def _one_object(stdout: str) -> dict:
    obj, end = json.JSONDecoder().raw_decode(stdout.lstrip())
    assert stdout.lstrip()[end:].strip() == "", f"more than one JSON value on stdout: {stdout!r}"
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("json")
    return fit(Recipe.model_validate(tiny_recipe(tmp, fine_tune={"epochs": 1}))).run_dir


def _bug(*args, **kwargs):
    raise ZeroDivisionError("a deliberate bug")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _cases(tmp_path, run_dir):
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe(tmp_path))
    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tmp_path, fine_tune={"lrr": 1}))
    images = make_imagefolder(tmp_path / "imgs", classes=("0", "1"), per_class=2)
    return {
        0: [("validate", good), ("inspect", good), ("models", "resnet18"), ("evaluate", run_dir),
            ("predict", run_dir, images), ("export", run_dir, "-f", "torchscript", "-o", tmp_path / "m.pt")],
        1: [("validate", bad), ("fit", bad), ("featurize", bad), ("evaluate", tmp_path / "nowhere"),
            ("predict", run_dir, tmp_path / "no-images"), ("export", tmp_path / "nowhere")],
        2: [("fit", good, "--bogus"), ("fit", good, "--nproc", "0"), ("fit",), ("evaluate", run_dir, "--device", "tpu"),
            ("predict", run_dir), ("fit", good, "--force", "--resume")],
        3: [("evaluate", run_dir, "--min-accuracy", "1.0")],
    }


@pytest.mark.parametrize("code", [0, 1, 2, 3])
def test_every_exit_code_prints_one_object(tmp_path, run_dir, capsys, code):
    for argv in _cases(tmp_path, run_dir)[code]:
        got, out, err = _run(capsys, *argv, "--json")
        assert got == code, (argv, err)
        obj = _one_object(out)
        assert obj["exit_code"] == code and obj["ok"] is (code == 0), (argv, obj)
        if code:
            assert obj["errors"] and all(isinstance(e, str) and e for e in obj["errors"]), (argv, obj)


@pytest.mark.parametrize("code,fault", [(70, _bug), (130, _interrupt)], ids=["bug", "interrupt"])
@pytest.mark.parametrize("verb", ["validate", "fit", "evaluate"])
def test_a_crash_or_an_interrupt_prints_one_object_too(tmp_path, run_dir, capsys, monkeypatch, code, fault, verb):
    import tlcli.engine.evaluate
    import tlcli.engine.inspect
    import tlcli.engine.train

    target = {"validate": (tlcli.engine.inspect, "validate_recipe"), "fit": (tlcli.engine.train, "fit"),
              "evaluate": (tlcli.engine.evaluate, "evaluate")}[verb]
    monkeypatch.setattr(*target, fault)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    got, out, err = _run(capsys, verb, run_dir if verb == "evaluate" else recipe, "--json")
    assert got == code, err
    obj = _one_object(out)
    assert obj == {"ok": False, "exit_code": code, "errors": obj["errors"]} and obj["errors"]
    if code == 70:
        assert "Traceback" in err and "ZeroDivisionError" in obj["errors"][0]


def test_the_table_in_the_readme_is_the_codes_tested_here():
    assert set(EXIT_CODES) == {0, 1, 2, 3, 70, 130}
