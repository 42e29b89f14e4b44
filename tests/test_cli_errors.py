"""Bad input gets clear lines, exit code 1 and no traceback."""

import pytest

from conftest import make_imagefolder, run_tl, tiny_recipe, write_recipe


def assert_user_error(code, output, *fragments):
    assert code == 1, output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


def test_missing_recipe_file_subprocess(tmp_path):
    proc = run_tl("fit", tmp_path / "missing.yaml")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.yaml'}: recipe file not found"


def test_yaml_syntax_error(cli, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "base:\n  zoo: timm\n  model: [x\noutput_dir: y\n")
    assert_user_error(*cli("fit", path), f"{path}:4: YAML syntax error")


def test_unknown_key_with_line_and_suggestion(cli, tmp_path):
    recipe = tiny_recipe(tmp_path)
    recipe["fine_tune"]["learning_rate"] = 0.1
    path = write_recipe(tmp_path / "r.yaml", recipe)
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "learning_rate" in l)
    assert_user_error(*cli("featurize", path), f"{path}:{line}: fine_tune.learning_rate: unknown key 'learning_rate'")


def test_unknown_layer_name_subprocess(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, freeze={"until": "blok.1"}))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "blok.1" in l)
    proc = run_tl("fit", path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{path}:{line}: freeze.until: unknown node 'blok.1'; did you mean 'block.1'" in proc.stderr


def test_unknown_head_layer(cli, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, head={"layer": "fcc"}))
    assert_user_error(*cli("fit", path), "head.layer: unknown layer 'fcc'; did you mean 'fc'")


def test_imagefolder_without_images(cli, tmp_path):
    (tmp_path / "imgs" / "cats").mkdir(parents=True)
    (tmp_path / "imgs" / "cats" / "notes.txt").write_text("not an image")
    data = {"imagefolder": str(tmp_path / "imgs"), "dataset": None, "limit": None}
    recipe = tiny_recipe(tmp_path, data=data)
    recipe["data"] = {k: v for k, v in recipe["data"].items() if v is not None}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_user_error(*cli("featurize", path), "data.imagefolder: no images found in")


def test_unreadable_image(cli, tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=10)
    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    recipe = tiny_recipe(tmp_path)
    recipe["data"] = {"imagefolder": str(root), "split": {"val": 0.1, "test": 0.2}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert_user_error(*cli("featurize", path), "broken.jpg: cannot read image")


def test_weights_not_found_offline_names_the_file(cli, tmp_path, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    recipe = tiny_recipe(tmp_path, base={"zoo": "torchvision", "model": "resnet18", "weights": "IMAGENET1K_V1"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert_user_error(*cli("fit", path), "cannot download", f"Offline, place the file at {expected}")


def test_missing_weights_file(cli, tmp_path):
    recipe = tiny_recipe(tmp_path, base={"weights": {"file": str(tmp_path / "nope.safetensors")}})
    assert_user_error(*cli("fit", write_recipe(tmp_path / "r.yaml", recipe)), "weights file not found")


def test_unknown_weights_enum_suggests(cli, tmp_path):
    recipe = tiny_recipe(tmp_path, base={"zoo": "torchvision", "model": "resnet18", "weights": "IMAGENET1K_V2"})
    assert_user_error(*cli("fit", write_recipe(tmp_path / "r.yaml", recipe)), "unknown weights 'IMAGENET1K_V2'", "did you mean")


def test_evaluate_before_fit(cli, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path))
    assert_user_error(*cli("evaluate", path), "no finished run here")


@pytest.mark.parametrize("zoo,model,hint", [("timm", "tf_efficientnet_lte0", "tf_efficientnet_lite0"), ("torchvision", "resnet19", "resnet18")])
def test_unknown_model_name(cli, tmp_path, zoo, model, hint):
    recipe = tiny_recipe(tmp_path, base={"zoo": zoo, "model": model})
    assert_user_error(*cli("fit", write_recipe(tmp_path / "r.yaml", recipe)), f"base.model: unknown {zoo} model '{model}'", hint)
