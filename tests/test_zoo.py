"""The zoo: the embedded weights' key mapping, weight sources, preprocessing, device choice."""

import hashlib

import numpy as np
import pytest
import torch

from tlcli.errors import TLError, WeightsError
from tlcli.config.schema import BaseSpec, WeightsSpec
from tlcli.model.zoo import (EMBEDDED_PREPROCESS, build_base, embedded_weights_path, fetch_checkpoint, hub_checkpoint_path, imagenet_class_names, load_file_weights, map_embedded_key)

from tlcli.engine.device import resolve_device

from conftest import LocalServer


@pytest.mark.parametrize(
    "embedded,timm_key",
    [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.1._bn1.weight", "blocks.1.0.bn2.weight"),
        ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
        ("_blocks.4._bn2.running_mean", "blocks.2.1.bn3.running_mean"),
        ("_blocks.11._depthwise_conv.weight", "blocks.5.0.conv_dw.weight"),
        ("_blocks.15._bn2.num_batches_tracked", "blocks.6.0.bn3.num_batches_tracked"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.weight", "bn2.weight"),
        ("_fc.bias", "classifier.bias"),
    ],
)
def test_embedded_key_rules(embedded, timm_key):
    assert map_embedded_key(embedded) == timm_key


def test_embedded_mapping_covers_timm_model_one_to_one():
    import timm

    raw = torch.load(embedded_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    mapped = {map_embedded_key(k): v.shape for k, v in raw.items()}
    assert len(raw) == 296
    assert set(mapped) == set(target)  # bijective: no key lost, none doubled
    assert all(target[k].shape == s for k, s in mapped.items())


def test_embedded_key_without_rule_is_refused():
    with pytest.raises(KeyError):
        map_embedded_key("_blocks.16._bn0.weight")
    with pytest.raises(KeyError):
        map_embedded_key("_something.weight")


def test_embedded_preprocessing_comes_from_the_weights():
    base = build_base(BaseSpec(zoo="timm", model="tf_efficientnet_lite0", weights=WeightsSpec(name="embedded")))
    assert base.preprocess == EMBEDDED_PREPROCESS
    assert base.source_classes[285] == "Egyptian cat"


@pytest.mark.real
def test_embedded_model_recognises_cat_and_espresso():
    """The truth test: real photos through the embedded pretrained network."""
    import skimage.data

    from tlcli.data.pipeline import fit_to_size, to_model_input

    base = build_base(BaseSpec(zoo="timm", model="tf_efficientnet_lite0", weights=WeightsSpec(name="embedded")))
    names = imagenet_class_names()
    # Through tl's own pipeline: uint8 resize, then normalisation on the device.
    batch = to_model_input(torch.stack([
        fit_to_size(torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1), base.preprocess)
        for img in (skimage.data.chelsea(), skimage.data.coffee())
    ]), base.preprocess, torch.device("cpu"))
    with torch.no_grad():
        probs = base.model(batch).softmax(1)
    cat, coffee = (names[i] for i in probs.argmax(1).tolist())
    assert cat in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}, cat
    assert coffee == "espresso"
    assert probs[0].max() > 0.5 and probs[1].max() > 0.5


def test_torchvision_preprocessing_from_enum_without_download(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    base = build_base(BaseSpec(zoo="torchvision", model="resnet18", weights=WeightsSpec(name="none")))
    pp = base.preprocess
    assert (pp.size, pp.resize, pp.mode) == (224, 256, "center_crop")
    assert pp.mean == pytest.approx((0.485, 0.456, 0.406))
    assert not (tmp_path / "hub").exists()


def test_input_size_override_keeps_ratio():
    base = build_base(BaseSpec(zoo="torchvision", model="resnet18", weights=WeightsSpec(name="none"), input_size=112))
    assert (base.preprocess.size, base.preprocess.resize) == (112, 128)


def _serve_checkpoint(tmp_path, name_prefix="weights"):

    state = {"w": torch.arange(6.0).reshape(2, 3)}
    raw = tmp_path / "payload.pth"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    served = tmp_path / "srv"
    served.mkdir()
    name = f"{name_prefix}-{digest[:8]}.pth"
    (served / name).write_bytes(raw.read_bytes())
    return served, name, state


def test_checkpoint_download_from_local_server_checks_hash(tmp_path):
    served, name, state = _serve_checkpoint(tmp_path)
    dest = tmp_path / "hub" / name
    with LocalServer(served) as srv:
        path = fetch_checkpoint(f"{srv.url}/{name}", dest)
    assert path == dest and torch.equal(torch.load(dest, weights_only=True)["w"], state["w"])
    # A second call uses the cached file and needs no server.
    assert fetch_checkpoint(f"http://127.0.0.1:9/{name}", dest) == dest


def test_checkpoint_download_with_wrong_hash_leaves_nothing(tmp_path):
    served, name, _ = _serve_checkpoint(tmp_path)
    bad_name = "weights-deadbeef.pth"
    (served / bad_name).write_bytes((served / name).read_bytes())
    dest = tmp_path / "hub" / bad_name
    with LocalServer(served) as srv, pytest.raises(WeightsError, match="place the file at"):
        fetch_checkpoint(f"{srv.url}/{bad_name}", dest)
    assert not dest.exists()


def test_hub_path_honours_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert hub_checkpoint_path("https://x/y/resnet18-f37072fd.pth") == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def test_file_weights_sha256_and_fit(tmp_path):
    from safetensors.torch import save_file

    from tlcli.model.tiny import TinyResNet

    model = TinyResNet()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    other = TinyResNet()
    load_file_weights(other, str(path), digest)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(WeightsError, match="sha256 is"):
        load_file_weights(other, str(path), "0" * 64)
    with pytest.raises(WeightsError, match="does not fit the model"):
        load_file_weights(torch.nn.Linear(2, 2), str(path), None)


def test_file_weights_refuse_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(WeightsError, match="weights-only"):
        load_file_weights(torch.nn.Linear(2, 2), str(path), None)


@pytest.mark.parametrize(
    "spec,cuda,expected",
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cpu", True, "cpu"), ("cuda:1", True, "cuda:1")],
)
def test_device_selection(spec, cuda, expected):
    assert str(resolve_device(spec, cuda_available=cuda, cuda_count=2)) == expected


def test_a_device_that_is_not_there_is_a_user_error():
    with pytest.raises(TLError, match="no CUDA device"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(TLError, match="has 1 CUDA device"):
        resolve_device("cuda:1", cuda_available=True, cuda_count=1)
    with pytest.raises(TLError, match="Metal backend is not available"):
        resolve_device("mps", mps_available=False)
    assert str(resolve_device("cuda:0", cuda_available=True, cuda_count=1)) == "cuda:0"


def test_validate_names_the_device_line_when_it_is_not_there(tmp_path, cli, monkeypatch):
    from conftest import tiny_recipe, write_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, device="cuda"))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.startswith("device"))
    code, out = cli("validate", path)
    assert code == 1 and f"{path}:{line}: device: cuda asked for, but no CUDA device is available" in out


def test_device_auto_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_architecture_only_build_keeps_the_weights_preprocessing():
    """A checkpoint rebuilds its base without weights; the input it was trained
    on still follows the recipe's weights (V1 resizes to 256, DEFAULT=V2 to 232)."""
    v1 = BaseSpec(zoo="torchvision", model="resnet50", weights=WeightsSpec(name="ResNet50_Weights.IMAGENET1K_V1"))
    assert build_base(v1, load_weights=False).preprocess.resize == 256
    embedded = BaseSpec(zoo="timm", model="tf_efficientnet_lite0", weights=WeightsSpec(name="embedded"))
    pp = build_base(embedded, load_weights=False).preprocess
    assert (pp.mean, pp.mode) == ((0.5, 0.5, 0.5), "squash")


def test_a_weights_file_from_another_task_loads_all_but_its_head(tmp_path):
    """The normal transfer case: the file's classifier has other classes; it is left out and
    everything else loads. Any other shape mismatch is still an error that names the tensor."""
    from safetensors.torch import save_file

    from tlcli.model.tiny import TinyResNet

    torch.manual_seed(3)
    donor = TinyResNet(num_classes=5)
    save_file(donor.state_dict(), str(tmp_path / "w.safetensors"))
    model = TinyResNet(num_classes=10)
    load_file_weights(model, str(tmp_path / "w.safetensors"), None)
    assert torch.equal(model.stem[0].weight, donor.stem[0].weight) and model.fc.weight.shape == (10, 8)
    wide = TinyResNet(num_classes=5, width=16)
    with pytest.raises(WeightsError, match=r"does not fit the model: shape mismatch \[.block.0.weight \(8, 8, 3, 3\) vs \(16, 16, 3, 3\)"):
        load_file_weights(wide, str(tmp_path / "w.safetensors"), None)


def test_a_malformed_safetensors_file_is_a_weights_error(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightsError, match="damaged or unreadable safetensors file"):
        load_file_weights(torch.nn.Linear(2, 2), str(tmp_path / "w.safetensors"), None)
