"""A user's mistake is exit 1 and one line, never a traceback (exit 70 means a bug in tl):
shapes surgery cannot run on, images that are odd but valid, names that are not UTF-8, the
operating system refusing a path, out of memory, and run or cache files someone changed."""

import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest
import yaml

from tlcli.config.schema import Recipe
from tlcli.engine.train import fit

from conftest import make_imagefolder, tiny_recipe, write_recipe


def _one_error(code, out, *fragments):
    assert code == 1, out
    assert "Traceback" not in out and "bug in tl" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors, out
    for fragment in fragments:
        assert fragment in out, out


# --------------------------------------------------------------------------- surgery on shapes


def test_a_pooling_kernel_larger_than_its_feature_map_is_an_error_at_its_line(tmp_path, cli):
    recipe = tiny_recipe(tmp_path, surgery=[
        {"add": {"name": "p", "type": "pooling", "pool": "max", "kernel": 64, "inputs": ["block.1"]}},
        {"add": {"name": "f", "type": "flatten", "inputs": ["p"]}},
        {"add": {"name": "head", "type": "linear", "inputs": ["f"]}},
        {"outputs": ["head"]},
    ])
    text = yaml.safe_dump(recipe, sort_keys=False)
    path = write_recipe(tmp_path / "r.yaml", text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "name: p" in l)
    code, out = cli("validate", path)
    _one_error(code, out, f"{path}:{line - 1}: surgery.0.add: 'p' (pooling) cannot run on its input of shape 8×32×32",
               "Output size is too small")


# --------------------------------------------------------------------------- images


def _animated_gif(path):
    import numpy as np
    from PIL import Image

    frames = [Image.fromarray(np.full((20, 30, 3), 60 * i, dtype=np.uint8)) for i in range(1, 4)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def test_an_animated_gif_is_read_as_its_first_frame():
    import tempfile

    from tlcli.data.pipeline import read_image

    with tempfile.TemporaryDirectory() as tmp:
        _animated_gif(os.path.join(tmp, "a.gif"))
        image = read_image(os.path.join(tmp, "a.gif"))
    assert tuple(image.shape) == (3, 20, 30) and int(image.float().mean()) == 60


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_a_folder_with_an_animated_gif_fits(tmp_path, cli, on_bad_image):
    root = make_imagefolder(tmp_path / "data", classes=("a", "b"), per_class=8)
    _animated_gif(root / "a" / "moving.gif")
    recipe = tiny_recipe(tmp_path, data={"imagefolder": str(root), "dataset": None, "limit": None,
                                          "on_bad_image": on_bad_image})
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    code, out = cli("fit", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 0, out


def _non_utf8_folder(root):
    """A class folder and a file whose names are Latin-1 bytes, as old archives and Windows shares have them."""
    make_imagefolder(root, classes=("a", "b"), per_class=10)
    os.rename(os.fsencode(root / "a"), os.fsencode(root) + b"/caf\xe9")
    first = sorted(os.listdir(os.fsencode(root / "b")))[0]
    os.rename(os.fsencode(root / "b") + b"/" + first, os.fsencode(root / "b") + b"/x\xff.png")
    return root


def test_names_that_are_not_utf8_go_through_fit_evaluate_and_predict(tmp_path, cli):
    root = _non_utf8_folder(tmp_path / "data")
    recipe = tiny_recipe(tmp_path, data={"imagefolder": str(root), "dataset": None, "limit": None})
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for args in (("fit", path), ("evaluate", path), ("predict", tmp_path / "run", root, "-o", tmp_path / "p.csv")):
        code, out = cli(*args)
        assert code == 0, (args, out)
    written = (tmp_path / "p.csv").read_bytes()
    assert b"x\xff.png" in written and "caf\udce9".encode("utf-8", "surrogateescape") in written  # the names as on disk
    # A second fit reads the digest index back, non-UTF-8 names included.
    assert cli("fit", path, "--force")[0] == 0


# --------------------------------------------------------------------------- the operating system says no


@pytest.mark.parametrize("case", ["name-too-long", "parent-missing", "device-as-cache"])
def test_the_operating_system_refusing_a_path_is_one_line_naming_it(tmp_path, cli, case):
    recipe = tiny_recipe(tmp_path)
    if case == "name-too-long":
        recipe["output_dir"] = str(tmp_path / ("x" * 300))
        fragment = "x" * 300
    elif case == "parent-missing":
        recipe["output_dir"] = "/proc/self/no/such/run"
        fragment = "/proc/self/no"
    else:
        recipe["cache"] = {"dir": "/dev/null"}
        fragment = "/dev/null"
    code, out = cli("fit", write_recipe(tmp_path / "r.yaml", recipe))
    _one_error(code, out, fragment)
    assert len(out.strip().splitlines()) == 1, out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mistakes")
    return fit(Recipe.model_validate(tiny_recipe(tmp, fine_tune={"epochs": 2}))).run_dir


def test_export_to_a_path_the_system_refuses_is_one_line(run_dir, cli):
    code, out = cli("export", run_dir, "--format", "torchscript", "-o", "/proc/self/no/model.pt")
    _one_error(code, out, "/proc/self/no")


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_a_device_that_does_not_exist_on_the_command_line_is_a_usage_error(run_dir, tmp_path, cli, verb):
    args = [verb, run_dir] + ([make_imagefolder(tmp_path / "i", classes=("0",), per_class=1)] if verb == "predict" else [])
    code, out = cli(*args, "--device", "tpu")
    assert code == 2 and "'tpu' is not one of auto, cpu, cuda, cuda:N, mps" in out and "Traceback" not in out


def test_a_device_that_is_not_here_on_the_command_line_names_the_option(run_dir, cli):
    code, out = cli("evaluate", run_dir, "--device", "cuda:7")
    _one_error(code, out, "--device cuda:7:")


@pytest.mark.slow
def test_out_of_memory_at_fit_is_one_line_naming_what_to_lower(tmp_path):
    # A 30M-wide layer: its activations at batch 64 are 7.7 GB, past the 7 GiB address-space
    # limit the fit runs under. The allocation really fails; nothing is simulated.
    recipe = tiny_recipe(tmp_path, surgery=[
        {"add": {"name": "big", "type": "linear", "n_out": 30_000_000, "inputs": ["flatten"]}},
        {"add": {"name": "out", "type": "linear", "inputs": ["big"]}},
        {"outputs": ["out"]},
    ], fine_tune={"batch_size": 64, "epochs": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (7 << 30, 7 << 30))

    done = subprocess.run([sys.executable, "-m", "tlcli", "fit", str(path)], preexec_fn=limit, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "error: out of memory while training stage 'fit' (batch 64)" in done.stderr
    assert "lower fine_tune.batch_size" in done.stderr


# --------------------------------------------------------------------------- files someone changed


def _copy(run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    return run


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("tamper,fragment", [
    (lambda r: _edit_json(r / "checkpoint.json", lambda m: m.update(frozen_modules=["nothing.here"])),
     "frozen_modules and frozen_attrs are not what the run's recipe freezes"),
    (lambda r: _edit_json(r / "checkpoint.json", lambda m: m.update(class_names=m["class_names"][:5])),
     "does not fit the run's model"),
    (lambda r: _edit_json(r / "checkpoint.json", lambda m: m.update(class_names=["a", "a", "b"])),
     "a class name appears twice"),
    (lambda r: (r / "checkpoint.json").write_text(re.sub(r'("mean": \[\s*)[-0-9.e]+', r"\1NaN",
                                                          (r / "checkpoint.json").read_text(), count=1)),
     "checkpoint.json: damaged (preprocess.mean.0"),
])
def test_a_tampered_checkpoint_is_one_line_naming_the_file(run_dir, tmp_path, cli, tamper, fragment):
    run = _copy(run_dir, tmp_path)
    tamper(run)
    code, out = cli("evaluate", run)
    _one_error(code, out, fragment)


def test_a_head_layer_with_layers_after_it_is_an_error_at_its_line_not_a_traceback_at_fit(tmp_path, cli):
    # Found by the fuzz (head.layer=fc1 on simple_cnn, whose fc2 then gets 10 inputs, not 128):
    # validate said ok and fit died with a shape traceback.
    recipe = tiny_recipe(tmp_path, base={"model": "simple_cnn"}, freeze={"until": "relu1"}, head={"layer": "fc1"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for command in ("validate", "fit"):
        code, out = cli(command, str(path))
        _one_error(code, out, "head.layer", "not the model's last classifier layer", "name the classifier ('fc2')")
    code, out = cli("validate", str(path), "head.layer=fc2")
    assert code == 0, out
