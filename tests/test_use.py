"""Using a trained run: predict, export, overrides, output for scripts, evaluate's targets,
the pictures, the catalogues, and the traps a new user hit (issue 10)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tlcli.errors import RecipeError
from tlcli.config.reading import parse_recipe
from tlcli.config.stages import recipe_warnings

from conftest import REPO, LocalServer, invoke, make_imagefolder, tiny_recipe, write_recipe

GOOD = """\
base: {zoo: timm, model: tf_efficientnet_lite0, weights: embedded}
data: {dataset: digits}
freeze: {until: global_pool}
fine_tune: {lr: 0.001}
stages:
  - {name: head}
  - {name: all, freeze: none}
output_dir: runs/x
"""


def tl(*args, cwd=None):
    """`tl ARGS` in-process, stdout and stderr apart: (exit code, stdout, stderr)."""
    result = invoke(*args, cwd=cwd)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A finished head-only run on an image folder (PNG files), written through the CLI."""
    root = tmp_path_factory.mktemp("folder_run")
    make_imagefolder(root / "images", per_class=14)
    recipe = tiny_recipe(root, data={"dataset": None, "imagefolder": str(root / "images"), "limit": None,
                                     "split": {"val": 0.2, "test": 0.25, "seed": 0}})
    recipe["data"].pop("dataset")
    path = write_recipe(root / "r.yaml", recipe)
    code, out, err = tl("fit", path, "--json", cwd=root)
    assert code == 0, err
    return root, path, Path(json.loads(out)["run_dir"])


# --------------------------------------------------------------------------- overrides


def test_overrides_set_values_and_are_validated_by_the_schema():
    r = parse_recipe(GOOD, "r.yaml", ["fine_tune.lr=0.01", "data.batch_size=32", "output_dir=runs/y",
                                      "stages.1.fine_tune.lr=1e-5", "data.classes=[1, 2, 3]"])
    assert (r.fine_tune.lr, r.data.batch_size, r.output_dir) == (0.01, 32, "runs/y")
    assert r.stages[1].fine_tune.lr == 1e-5 and r.data.classes == ["1", "2", "3"]
    with pytest.raises(RecipeError) as err:
        parse_recipe(GOOD, "r.yaml", ["fine_tune.lrr=0.01", "data.batch_size=0", "fine_tune.lr=0.02"])
    assert str(err.value).splitlines() == [
        "override data.batch_size: Input should be greater than or equal to 1",
        "override fine_tune.lrr: unknown key 'lrr'; did you mean 'lr'?",
    ]


def test_malformed_overrides_are_all_reported():
    with pytest.raises(RecipeError) as err:
        parse_recipe(GOOD, "r.yaml", ["lr", "stages.5.name=x", "fine_tune.lr.x=1", "data.split=[unclosed"])
    lines = str(err.value).splitlines()
    assert lines[0] == "override lr: expected KEY=VALUE with a dotted KEY, e.g. fine_tune.lr=0.01"
    assert "override stages.5.name: stages is a list of 2; index it with 0..1" in lines
    assert "override fine_tune.lr.x: fine_tune.lr is 0.001, not a section with keys" in lines
    assert any(line.startswith("override data.split: VALUE is not YAML") for line in lines)


def test_a_file_problem_keeps_its_line_beside_an_override_problem():
    with pytest.raises(RecipeError) as err:
        parse_recipe(GOOD.replace("lr: 0.001", "lr: -1"), "r.yaml", ["data.batch_size=0"])
    assert str(err.value).splitlines() == ["r.yaml:4: fine_tune.lr: Input should be greater than 0",
                                           "override data.batch_size: Input should be greater than or equal to 1"]


def test_validate_print_shows_the_resolved_recipe_with_overrides_and_defaults(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    code, out, err = tl("validate", path, "fine_tune.lr=0.05", "--print")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["fine_tune"]["lr"] == 0.05 and resolved["fine_tune"]["momentum"] == 0.9  # a default
    assert resolved["data"]["num_workers"] == "auto"
    code, out, err = tl("validate", path, "fine_tune.lrr=0.05")
    assert code == 1 and "override fine_tune.lrr: unknown key 'lrr'; did you mean 'lr'?" in err


def test_fit_saves_the_values_it_used_with_absolute_paths(tmp_path):
    make_imagefolder(tmp_path / "images", per_class=8)
    recipe = tiny_recipe(tmp_path, data={"dataset": None, "imagefolder": "images", "limit": None},
                         cache={"dir": "cache"}, output_dir="runs/a")
    recipe["data"].pop("dataset")
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = tl("fit", path, "fine_tune.epochs=1", "output_dir=runs/b", "-q", cwd=tmp_path)
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "runs/b/recipe.yaml").read_text())
    assert saved["fine_tune"]["epochs"] == 1 and not (tmp_path / "runs/a").exists()
    assert saved["data"]["imagefolder"] == str(tmp_path / "images")
    assert saved["output_dir"] == str(tmp_path / "runs/b") and saved["cache"]["dir"] == str(tmp_path / "cache")
    # The run does not depend on the directory tl was started from.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = tl("evaluate", tmp_path / "runs/b", "--json", cwd=elsewhere)
    assert code == 0, err
    assert json.loads(out)["n"] > 0


# --------------------------------------------------------------------------- scripts and CI


def test_json_output_is_one_object_on_stdout_for_every_verb(folder_run, tmp_path):
    root, recipe, run = folder_run
    code, out, err = tl("featurize", recipe, "--json", cwd=root)
    assert code == 0 and json.loads(out)["caches"][0]["rows"]["train"] > 0
    code, out, err = tl("evaluate", run, "--json")
    metrics = json.loads(out)
    assert code == 0 and "test accuracy" in err  # the human summary goes to stderr
    assert {"accuracy", "top5", "macro_f1", "per_class", "n", "confusion_matrix"} <= set(metrics)
    code, out, err = tl("predict", run, root / "images" / "a", "--json")
    assert code == 0 and len(json.loads(out)["predictions"]) == 14


def test_json_errors_are_json_too_with_the_exit_code(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"lr": -1}))
    code, out, err = tl("fit", path, "--json")
    assert code == 1 and "fine_tune.lr" in err
    report = json.loads(out)
    assert report["ok"] is False and report["exit_code"] == 1 and "fine_tune.lr" in report["errors"][0]


def test_quiet_prints_nothing_but_warnings(folder_run):
    root, recipe, run = folder_run
    code, out, err = tl("evaluate", run, "-q")
    assert code == 0 and out == "" and err == ""


def test_min_accuracy_is_a_ci_gate_with_its_own_exit_code(folder_run):
    from tlcli.cli import EXIT_BELOW_MIN

    _, _, run = folder_run
    assert tl("evaluate", run, "--min-accuracy", "0", "-q")[0] == 0
    code, out, err = tl("evaluate", run, "--min-accuracy", "1", "--json")
    accuracy = json.loads(out)["accuracy"]
    assert accuracy < 1.0, "the tiny run should not be perfect; the gate needs a failing case"
    assert code == EXIT_BELOW_MIN == 3 and json.loads(out)["passed"] is False
    assert f"accuracy {accuracy:.4f} is below --min-accuracy 1.0" in err
    assert tl("evaluate", run, "--min-accuracy", "1.5")[0] == 2  # usage error: out of range


def test_every_exit_code_is_in_the_readme():
    from tlcli.cli import EXIT_CODES

    readme = (REPO / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} |" in readme, f"exit code {code} ({meaning}) is not in the README's table"


def test_progress_without_a_tty_is_a_few_whole_lines():
    import io

    from tlcli.progress import LineReporter

    stream = io.StringIO()
    reporter = LineReporter(stream)
    description = "featurize " + "a-long-split-name-" * 6  # longer than 80 columns
    with reporter.task(description, total=1000, unit="img") as task:
        for _ in range(1000):
            task.advance(1, status="loss 0.1234")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # 25 %, 50 %, 75 %, done
    assert all(line.startswith(description + ": ") for line in lines) and "1000/1000 img" in lines[-1]
    assert all(len(line) > 120 for line in lines)  # never cut at 80 columns


# --------------------------------------------------------------------------- evaluate's targets


def test_bare_evaluate_scores_the_last_run_fit_here(tmp_path):
    code, _, err = tl("evaluate", cwd=tmp_path)
    assert code == 1 and "no `tl fit` has finished in this directory" in err
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    assert tl("fit", path, "-q", cwd=tmp_path)[0] == 0
    code, out, err = tl("evaluate", "--json", cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["run_dir"] == str((tmp_path / "run").resolve())


def test_evaluate_data_scores_another_folder_with_the_runs_classes(folder_run, tmp_path):
    _, _, run = folder_run
    make_imagefolder(tmp_path / "more", classes=("a", "c"), per_class=3)
    code, out, err = tl("evaluate", run, "--data", tmp_path / "more", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["n"] == 6 and metrics["per_class"]["b"]["support"] == 0
    assert Path(metrics["eval_dir"]) == run / "eval" / "more" and (run / "eval/more/report.html").is_file()
    (tmp_path / "more" / "zebra").mkdir()
    code, _, err = tl("evaluate", run, "--data", tmp_path / "more")
    assert code == 1 and "the run has no class 'zebra'" in err


def test_evaluate_draws_top_losses_and_a_self_contained_report(folder_run):
    from PIL import Image

    _, _, run = folder_run
    assert tl("evaluate", run, "-q")[0] == 0
    with Image.open(run / "eval" / "top_losses.png") as im:
        assert im.size[0] >= 600 and len(np.unique(np.asarray(im.convert("L")))) > 20  # a real picture, not blank
    page = (run / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    assert "src=\"http" not in page and "href=" not in page  # nothing fetched from elsewhere
    assert "tiny_resnet" in page  # the recipe is on the page


def test_top_losses_are_the_most_confidently_wrong():
    from tlcli.engine.inference import Scored
    from tlcli.engine.evaluate import top_losses

    logits = np.array([[5.0, 0.0], [0.0, 5.0], [2.0, 0.0], [0.0, 1.0]])
    labels = np.array([1, 1, 1, 0])  # rows 0, 2, 3 wrong; row 0 most confidently
    items = top_losses(Scored(logits, labels, ["w", "x", "y", "z"]), ["n", "p"])
    assert [i["source"] for i in items] == ["w", "y", "z"]
    assert items[0]["true"] == "p" and items[0]["predicted"] == "n" and items[0]["probability"] > 0.99


CHROMIUM = next((str(Path(p, "chromium")) for p in os.environ["PATH"].split(os.pathsep) if Path(p, "chromium").exists()),
                None)
# Injected first into a copy of the page: what a person would check, written where --dump-dom shows it.
PROBE = """<script>
window.__tl = {errors: []};
window.addEventListener('error', e => window.__tl.errors.push(String(e.message || e.target && e.target.src)), true);
const error = console.error; console.error = (...a) => { window.__tl.errors.push(a.join(' ')); error(...a); };
window.addEventListener('load', () => document.documentElement.setAttribute('data-tl-check', JSON.stringify({
  images: [...document.images].map(i => [i.alt, i.naturalWidth, i.complete]),
  fetched: performance.getEntriesByType('resource').map(e => e.name),
  errors: window.__tl.errors})));
</script>"""


def _browser():
    if CHROMIUM is None:
        # CI installs chromium (.ci/run); there a missing browser is a failure, not a skip.
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("no headless chromium on this machine (CI installs it)")
    return CHROMIUM


def test_the_report_renders_in_a_real_browser(folder_run, tmp_path):
    from PIL import Image

    chromium = _browser()
    _, _, run = folder_run
    assert tl("evaluate", run, "-q")[0] == 0
    page = (run / "eval" / "report.html").read_text()
    probed = tmp_path / "report.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    import html as html_lib
    import re

    check = json.loads(html_lib.unescape(re.search(r'data-tl-check="([^"]*)"', dom).group(1)))
    assert len(check["images"]) >= 3, check  # curves, confusion matrix, top losses
    assert all(width > 0 and complete for _, width, complete in check["images"]), check["images"]
    assert check["errors"] == [], check["errors"]
    assert all(name.startswith("data:") for name in check["fetched"]), check["fetched"]  # nothing from the network
    # And it looks like a page: the pictures are drawn, not just the text at the top.
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--hide-scrollbars", "--window-size=1100,2400", f"--screenshot={shot}",
                    (run / "eval" / "report.html").as_uri()], capture_output=True, timeout=180, check=True)
    with Image.open(shot) as im:
        grey = np.asarray(im.convert("L"))
    assert (grey < 100).any(axis=1).mean() > 0.3


# --------------------------------------------------------------------------- predict


def test_predict_takes_files_folders_and_globs_and_writes_csv(folder_run, tmp_path):
    root, _, run = folder_run
    images = root / "images"
    one = next((images / "b").iterdir())
    code, out, err = tl("predict", run, one, images / "a", str(images / "c" / "*.png"), "-k", "9", "--json",
                        "-o", tmp_path / "new" / "p.csv")
    assert code == 0, err
    report = json.loads(out)
    assert report["top_k"] == 3  # capped at the number of classes
    assert len(report["predictions"]) == 1 + 14 + 14 and report["predictions"][0]["path"] == str(one)
    top = report["predictions"][0]["top"]
    assert sum(t["probability"] for t in top) == pytest.approx(1.0) and top[0]["probability"] >= top[1]["probability"]
    rows = (tmp_path / "new" / "p.csv").read_text().splitlines()  # its folder made as needed
    assert rows[0] == "path,class_1,probability_1,class_2,probability_2,class_3,probability_3" and len(rows) == 30
    code, _, err = tl("predict", run, root / "nothing-here*.png")
    assert code == 1 and "no image files there" in err


def test_predict_sees_what_training_saw(folder_run):
    """Predict's probabilities on the test files equal the softmax of the logits that the
    cached features give: the same decode, resize and normalisation as featurize."""
    import torch

    from tlcli.run.checkpoint import load_checkpoint
    from tlcli.data.sources import plan_data
    from tlcli.engine.inference import cached_logits
    from tlcli.engine.predict import predict
    from tlcli.run.rundir import RunDir

    _, _, run = folder_run
    ckpt = load_checkpoint(run)
    recipe = RunDir(run).read_recipe()
    plan = plan_data(recipe.data)
    cached = cached_logits(ckpt, plan, recipe.cache, torch.device("cpu"))
    assert cached is not None
    result = predict(run, [s for s, _ in plan.splits["test"]], top_k=3)
    probs = torch.softmax(torch.from_numpy(cached.logits).double(), 1)
    got = {p.path: dict(p.top) for p in result.predictions}
    for source, row in zip(cached.sources, probs):
        for c, name in enumerate(ckpt.class_names):
            assert got[source][name] == pytest.approx(float(row[c]), abs=1e-4)


# --------------------------------------------------------------------------- export


def _surgery_run(tmp_path):
    make_imagefolder(tmp_path / "images", per_class=10)
    ops = [{"remove_output_layers": 2},
           {"add": {"name": "hidden", "type": "linear", "inputs": ["flatten"], "n_out": 6, "activation": "relu"}},
           {"add": {"name": "predictions", "type": "linear", "inputs": ["hidden_act"]}},
           {"outputs": ["predictions"]}]
    recipe = tiny_recipe(tmp_path, data={"dataset": None, "imagefolder": str(tmp_path / "images"), "limit": None},
                         surgery=ops, fine_tune={"epochs": 2})
    recipe["data"].pop("dataset")
    code, out, err = tl("fit", write_recipe(tmp_path / "r.yaml", recipe), "--json")
    assert code == 0, err
    return Path(json.loads(out)["run_dir"])


def _reference(run: Path, files: list[str]):
    """uint8 NCHW inputs at the model's size, and tl's own probabilities for them."""
    import torch

    from tlcli.run.checkpoint import load_checkpoint
    from tlcli.data.pipeline import load_sized, to_model_input

    ckpt = load_checkpoint(run)
    images = torch.stack([load_sized(f, ckpt.preprocess) for f in files])
    assert images.dtype == torch.uint8
    with torch.no_grad():
        probs = torch.softmax(ckpt.model.eval()(to_model_input(images, ckpt.preprocess, torch.device("cpu"))), 1)
    return images.contiguous().numpy(), probs.numpy()


@pytest.mark.parametrize("which", ["head-only", "surgery"])
def test_exported_models_match_pytorch_without_tl(folder_run, tmp_path, which):
    import onnxruntime

    run = folder_run[2] if which == "head-only" else _surgery_run(tmp_path)
    files = sorted(str(p) for p in (folder_run[0] / "images").rglob("*.png"))[::4]
    images, expected = _reference(run, files)

    code, _, err = tl("export", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert code == 0, err
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["class_names"] == ["a", "b", "c"] and side["input_size"] == images.shape[-1]
    assert side["input"]["dtype"] == "uint8" and len(side["mean"]) == len(side["std"]) == 3
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    code, _, err = tl("export", run, "--format", "torchscript", "-o", tmp_path / "m.pt")
    assert code == 0, err
    np.save(tmp_path / "x.npy", images)
    script = ("import sys; sys.modules['tlcli'] = None; sys.modules['timm'] = None\n"  # neither may be imported
              "import numpy as np, torch\n"
              f"m = torch.jit.load({str(tmp_path / 'm.pt')!r})\n"
              f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
              f"np.save({str(tmp_path / 'y.npy')!r}, m(x).detach().numpy())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, atol=1e-4, rtol=0)


def test_export_names_a_bad_format(folder_run):
    code, _, err = tl("export", folder_run[2], "--format", "tflite")
    assert code == 1 and "--format tflite: not one of onnx, torchscript" in err


# --------------------------------------------------------------------------- traps


def test_a_recipe_without_freeze_warns_and_freeze_none_says_so(tmp_path):
    r = parse_recipe(GOOD.replace("freeze: {until: global_pool}\n", "").replace("stages:\n  - {name: head}\n  - {name: all, freeze: none}\n", ""), "r.yaml")
    assert recipe_warnings(r) and "freeze: not given: the whole network trains" in recipe_warnings(r)[0]
    explicit = parse_recipe(GOOD.replace("freeze: {until: global_pool}", "freeze: none").replace(
        "stages:\n  - {name: head}\n  - {name: all, freeze: none}\n", ""), "r.yaml")
    assert recipe_warnings(explicit) == [] and explicit.freeze.nodes == [] and explicit.freeze.all_but_last is None
    assert parse_recipe(GOOD, "r.yaml").stages[1].freeze.nodes == []
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, freeze=None))
    code, out, err = tl("validate", path)
    assert code == 0 and "warning: " in err and "freeze: not given" in err


def test_tiny_images_get_a_hint_about_input_size(tmp_path):
    from tlcli.data.sources import plan_data, size_hint
    from tlcli.config.schema import DataSpec

    digits = plan_data(DataSpec(dataset="digits"))
    hint = size_hint(digits, 224)
    assert "about 8 px" in hint and "base.input_size: 112 featurizes" in hint
    assert "base.input_size: 192 " in size_hint(digits, 384) and "base.input_size: 112 " in size_hint(digits, 160)
    # Where it stops paying it stops: at 112 px and below, no hint (it used to say "try 56" at 112).
    assert size_hint(digits, 112) is None and size_hint(digits, 96) is None
    make_imagefolder(tmp_path / "images", per_class=3)  # 24 px images
    folder = plan_data(DataSpec(imagefolder=str(tmp_path / "images"), split={"val": 0.0, "test": 0.34}))
    assert size_hint(folder, 64) is None and "about 24 px" in size_hint(folder, 224)


def test_flags_do_not_read_as_taking_a_value_and_every_command_has_an_example():
    for command in ("validate", "inspect", "featurize", "fit", "evaluate", "predict", "export", "models"):
        code, out, _ = tl(command, "--help")
        assert code == 0 and "Examples:" in out and "$ tl " + command in out, command
        assert "<bool>" not in out, command


def test_shell_completion_is_enabled():
    env = {**os.environ, "_TL_COMPLETE": "complete_bash", "COMP_WORDS": "tl fi", "COMP_CWORD": "1"}
    # The completion variable is named after the program: the installed `tl` script.
    done = subprocess.run([str(Path(sys.executable).parent / "tl")], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["fit"]
    assert "--install-completion" in tl("--help")[1]


# --------------------------------------------------------------------------- catalogues


def test_models_lists_the_zoos_and_what_is_offline():
    code, out, _ = tl("models", "tf_efficientnet_lite0", "--json")
    rows = json.loads(out)["models"]
    assert code == 0 and {"zoo": "timm", "model": "tf_efficientnet_lite0", "weights": "embedded", "offline": True} in rows
    code, out, _ = tl("models", "resnet18", "--json")
    zoos = {(r["zoo"], r["weights"]) for r in json.loads(out)["models"]}
    assert ("torchvision", "ResNet18_Weights.IMAGENET1K_V1") in zoos and ("timm", "pretrained") in zoos
    code, out, _ = tl("models", "tiny", "--offline")
    assert code == 0 and "tiny_resnet" in out


def test_recipes_lists_and_copies_the_shipped_ones(tmp_path):
    code, out, _ = tl("recipes")
    assert code == 0 and out.startswith("digits-two-stage") and "quickstart" in out
    code, out, _ = tl("recipes", "cp", "quickstart", tmp_path)
    assert code == 0 and (tmp_path / "quickstart.yaml").read_text() == (REPO / "recipes/quickstart.yaml").read_text()
    code, _, err = tl("recipes", "cp", "quickstart", tmp_path)
    assert code == 1 and "already exists" in err
    code, _, err = tl("recipes", "cp", "quikstart", tmp_path / "x.yaml")
    assert code == 1 and "did you mean 'quickstart'" in err


# --------------------------------------------------------------------------- hub weights


HUB_MODEL = "test_efficientnet.r160_in1k"
HUB_CHECK = """
import sys, torch
from safetensors.torch import load_file
from tlcli.errors import WeightsError
from tlcli.config.schema import BaseSpec
from tlcli.model.zoo import build_base
try:
    zoo = build_base(BaseSpec(zoo="timm", model="{model}", weights="pretrained"))
except WeightsError as err:
    print("WeightsError:", err)
    sys.exit(3)
served = load_file(sys.argv[1])
state = zoo.model.state_dict()
assert all(torch.equal(state[k], v) for k, v in served.items()), "weights differ from the served file"
print("loaded", len(served))
"""


def hub_server(root: Path) -> LocalServer:
    """The two requests huggingface_hub makes for a file (HEAD, then GET of
    /REPO/resolve/REVISION/FILE), answered from a folder on 127.0.0.1."""
    import hashlib
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            """Silent: a request log would bury the test's own output."""

        def _answer(self, body: bool):
            path = root / self.path.split("?")[0].lstrip("/")
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

    return LocalServer(root, Handler)


def _hub_env(tmp_path, endpoint):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return env


def test_timm_pretrained_weights_come_through_the_hub_from_a_loopback_server(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(1)
    served = {k: v.contiguous() for k, v in timm.create_model(HUB_MODEL).state_dict().items()
              if v.dtype.is_floating_point}
    repo = tmp_path / "site" / "timm" / HUB_MODEL / "resolve" / "main"
    repo.mkdir(parents=True)
    save_file(served, repo / "model.safetensors")
    save_file(served, tmp_path / "served.safetensors")
    with hub_server(tmp_path / "site") as server:
        done = subprocess.run([sys.executable, "-c", HUB_CHECK.format(model=HUB_MODEL), str(tmp_path / "served.safetensors")],
                              env=_hub_env(tmp_path, server.url), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stdout + done.stderr
    cached = list((tmp_path / "hf").rglob("model.safetensors"))
    assert cached, "the file should be in the hub cache"
    # Offline now: the hub cache answers, no server needed.
    again = subprocess.run([sys.executable, "-c", HUB_CHECK.format(model=HUB_MODEL), str(tmp_path / "served.safetensors")],
                           env={**_hub_env(tmp_path, "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr


def test_offline_hub_weights_name_the_repo_and_file_to_place(tmp_path):
    done = subprocess.run([sys.executable, "-c", HUB_CHECK.format(model=HUB_MODEL), "unused"],
                          env=_hub_env(tmp_path, "http://127.0.0.1:9"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"timm/{HUB_MODEL}" in done.stdout and "model.safetensors" in done.stdout and "HF_HOME" in done.stdout


@pytest.mark.parametrize("switch", [3, 55, 59])
def test_stage_labels_on_the_curves_stay_inside_their_plot(switch):
    from tlcli.report.plots import _pyplot, curves_figure

    rows = [{"stage": "head" if e < switch else "finetune", "epoch": e, "train_loss": 1 / e, "train_acc": 0.5,
             "val_loss": 1 / e, "val_acc": 0.5} for e in range(1, 61)]
    fig = curves_figure(rows)
    fig.canvas.draw()  # places the label boxes
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_window_extent(renderer)
        labels = [t for t in ax.texts if t.get_text().startswith(("head", "finetune"))]
        assert {t.get_text().rstrip(" →") for t in labels} == {"head", "finetune"}
        for t in labels:
            extent = t.get_bbox_patch().get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, t.get_text()
            assert t.get_fontsize() >= 10
    _pyplot().close(fig)


def test_a_fit_that_cannot_note_itself_still_succeeds(tmp_path):
    (tmp_path / ".tl").write_text("in the way")  # where the last run is noted: not a directory
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, fine_tune={"epochs": 1}))
    code, _, err = tl("fit", path, "-q", cwd=tmp_path)
    assert code == 0 and "warning: could not note the run" in err and "tl evaluate " in err
    assert (tmp_path / "run" / "checkpoint.json").is_file()


def test_predict_on_nothing_decodable_says_so(folder_run, tmp_path):
    _, recipe, _ = folder_run
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, _, err = tl("predict", recipe, tmp_path / "broken.png")
    assert code == 1 and "broken.png" in err and "Traceback" not in err
    code, _, err = tl("predict", recipe, tmp_path / "broken.png", "data.on_bad_image=skip")  # an override, on a recipe
    assert code == 1 and "none of the 1 image(s) could be decoded" in err
