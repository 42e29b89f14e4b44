"""The shipped seed recipes: they validate, and they run end to end at reduced
size (small images, a few samples, one epoch), with B's checkpoint feeding C
and the 0-4 CNN feeding the Keras-blog fine-tune."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tlcli.config.reading import load_recipe

from conftest import REPO, inspect_rows, make_imagefolder, write_recipe

RECIPES = REPO / "recipes"
SEEDS = ["vgg16-a-replace-predictions", "vgg16-b-bottleneck", "vgg16-c-continue",
         "keras-blog-digits-0to4", "keras-blog-digits", "keras-blog-digits-scratch"]


@pytest.mark.parametrize("name", SEEDS)
def test_seed_recipe_validates(name):
    load_recipe(RECIPES / f"{name}.yaml")


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """A seeded random VGG16 state dict on disk, standing in for the ImageNet download."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vgg16-random.safetensors"
    save_file({k: v.contiguous() for k, v in torchvision.models.vgg16().state_dict().items()}, str(path))
    return path


def _shrunk(name: str, tmp_path, data: dict, **changes) -> dict:
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    recipe["data"] = {**data, "batch_size": 8}
    recipe["fine_tune"].update(epochs=1, batch_size=8)
    recipe["cache"] = {"dir": str(tmp_path / "cache")}
    recipe["output_dir"] = str(tmp_path / name)
    recipe["device"] = "cpu"
    for key, value in changes.items():
        recipe[key] = value
    return recipe


@pytest.mark.real
def test_vgg16_workflows_a_b_c_end_to_end(tmp_path, cli, vgg16_file):
    folder = {"imagefolder": str(make_imagefolder(tmp_path / "flowers", per_class=6)), "split": {"val": 0.2, "test": 0.2, "seed": 0}}
    weights = {"zoo": "torchvision", "model": "vgg16", "weights": {"file": str(vgg16_file)}, "input_size": 32}

    a = write_recipe(tmp_path / "a.yaml", _shrunk("vgg16-a-replace-predictions", tmp_path, folder, base=weights))
    assert cli("fit", a)[0] == 0
    assert cli("evaluate", a)[0] == 0

    b = write_recipe(tmp_path / "b.yaml", _shrunk("vgg16-b-bottleneck", tmp_path, folder, base=weights))
    code, out = cli("inspect", b)
    assert code == 0, out
    rows = inspect_rows(out)
    assert rows["classifier.3"][3] == "1024" and rows["fc3"][3] == "256" and "new" in rows["fc3"]
    assert rows["predictions"][3] == "3" and "classifier.6" not in rows
    assert "frontier" in rows["features.30"]
    assert cli("fit", b)[0] == 0
    assert cli("evaluate", b)[0] == 0
    trained_b = load_file(str(tmp_path / "vgg16-b-bottleneck" / "model.safetensors"))
    assert trained_b["classifier.3.weight"].shape == (1024, 4096) and trained_b["fc3.weight"].shape == (256, 1024)

    c = write_recipe(tmp_path / "c.yaml", _shrunk("vgg16-c-continue", tmp_path, folder,
                                                   base={"checkpoint": str(tmp_path / "vgg16-b-bottleneck")}))
    code, out = cli("fit", c)
    assert code == 0, out
    assert cli("evaluate", c)[0] == 0
    trained_c = load_file(str(tmp_path / "vgg16-c-continue" / "model.safetensors"))
    assert trained_c.keys() == trained_b.keys()
    # Up to block4_pool stays B's; block 5 now trained.
    assert torch.equal(trained_c["features.21.weight"], trained_b["features.21.weight"])
    assert not torch.equal(trained_c["features.28.weight"], trained_b["features.28.weight"])
    meta = json.loads((tmp_path / "vgg16-c-continue" / "checkpoint.json").read_text())
    assert meta["frontier"] == ["features.23"]


def test_keras_blog_workflow_end_to_end(tmp_path, cli):
    low = {"dataset": "digits", "classes": ["0", "1", "2", "3", "4"], "limit": 100, "split": {"val": 0.1, "test": 0.2, "seed": 0}}
    high = {**low, "classes": ["5", "6", "7", "8", "9"]}
    first = write_recipe(tmp_path / "0to4.yaml", _shrunk("keras-blog-digits-0to4", tmp_path, low))
    assert cli("fit", first)[0] == 0
    second = _shrunk("keras-blog-digits", tmp_path, high, base={"checkpoint": str(tmp_path / "keras-blog-digits-0to4")})
    path = write_recipe(tmp_path / "ft.yaml", second)
    code, out = cli("inspect", path)
    assert code == 0 and "input_adapter" in out and "◀ frontier" in out
    assert cli("fit", path)[0] == 0
    code, out = cli("evaluate", path)
    assert code == 0 and "test accuracy" in out
    base = load_file(str(tmp_path / "keras-blog-digits-0to4" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "keras-blog-digits" / "model.safetensors"))
    assert torch.equal(base["conv2.weight"], tuned["conv2.weight"])  # frozen: all but the last two layers
    assert not torch.equal(base["fc1.weight"], tuned["fc1.weight"])
    meta = json.loads((tmp_path / "keras-blog-digits" / "checkpoint.json").read_text())
    assert meta["class_names"] == ["5", "6", "7", "8", "9"] and meta["frontier"] == ["flatten"]
