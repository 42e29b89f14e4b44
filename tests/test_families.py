"""One model of each common timm and torchvision family, random weights, small inputs, through
every command: validate at a boundary near the end and one in the middle, inspect, featurize,
fit, evaluate, and an ONNX export that onnxruntime runs to the same probabilities as tl.

"By node on any fx graph" is a promise about families, and families break in their own ways
(a patch grid fixed at construction, a parameter reshaped before use, a classifier that is a
1×1 convolution, a zoo's own Linear subclass). The README's family table is this list."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import invoke, tiny_recipe, write_recipe

# name -> (zoo, model, a boundary in the middle of the network[, input size when not SIZE])
FAMILIES = {
    "resnet": ("timm", "resnet18", "layer2"),
    "resnetv2": ("timm", "resnetv2_18", "stages.1"),
    "efficientnet": ("timm", "efficientnet_b0", "blocks.3"),
    "mobilenetv3": ("timm", "mobilenetv3_small_100", "blocks.3"),
    "mobilenetv4": ("timm", "mobilenetv4_conv_small", "blocks.2"),
    "convnext": ("timm", "convnext_atto", "stages.1"),
    "regnet": ("timm", "regnetx_002", "s2"),
    "densenet": ("timm", "densenet121", "features.denseblock2"),
    "vit": ("timm", "vit_tiny_patch16_224", "blocks.5"),
    "deit": ("timm", "deit_tiny_patch16_224", "blocks.5"),
    "swin": ("timm", "swin_tiny_patch4_window7_224", "layers.1"),
    "levit": ("timm", "levit_128s", "stages.1"),
    "mixer": ("timm", "mixer_s16_224", "blocks.3"),
    "ghostnet": ("timm", "ghostnet_100", "blocks.5"),
    "rexnet": ("timm", "rexnet_100", "features.8"),
    "fastvit": ("timm", "fastvit_t8", "stages.1"),
    # Its attention biases are fixed for 224 px at construction, and it takes no img_size.
    "efficientformer": ("timm", "efficientformer_l1", "stages.1", 224),
    "torchvision resnet": ("torchvision", "resnet18", "layer2"),
    "torchvision vgg": ("torchvision", "vgg11", "features.10"),
}
SIZE = 64


def _recipe(tmp_path, zoo: str, model: str, freeze: dict, size: int = SIZE) -> dict:
    recipe = tiny_recipe(tmp_path, base={"zoo": zoo, "model": model, "weights": "none", "input_size": size},
                         data={"limit": 60, "split": {"val": 0.2, "test": 0.2, "seed": 0}, "batch_size": 16},
                         fine_tune={"epochs": 2, "batch_size": 16})
    return {**recipe, "freeze": freeze}


def _ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, f"tl {' '.join(map(str, args))} exited {result.exit_code}\n{result.output}"
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_works_on_one_model_of_each_family(family, tmp_path):
    import onnxruntime
    import torch

    from tlcli.data.pipeline import to_model_input
    from tlcli.run.checkpoint import load_checkpoint

    zoo, model, middle, *size = FAMILIES[family]
    near_end = write_recipe(tmp_path / "near-end.yaml", _recipe(tmp_path, zoo, model, {"all_but_last": 1}, *size))
    path = write_recipe(tmp_path / "middle.yaml", _recipe(tmp_path, zoo, model, {"until": middle}, *size))
    _ok("validate", near_end)
    _ok("validate", path)
    assert middle in _ok("inspect", path)
    _ok("featurize", path)
    _ok("fit", path)
    assert "test accuracy" in _ok("evaluate", path)
    _ok("export", tmp_path / "run", "--format", "onnx", "-o", tmp_path / "m.onnx")

    ckpt = load_checkpoint(tmp_path / "run")
    pp = ckpt.preprocess
    rng = np.random.default_rng(0)  # fixed: the images only need to be the same for both runtimes
    images = rng.integers(0, 256, (3, pp.channels, pp.size, pp.size), dtype=np.uint8)
    with torch.no_grad():
        logits = ckpt.model.eval()(to_model_input(torch.from_numpy(images), pp, torch.device("cpu")))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(got, torch.softmax(logits, 1).numpy(), atol=1e-4, rtol=0)
    # Passed: its files go now, not when pytest prunes old temp dirs (VGG's run, resume state
    # and ONNX file are gigabytes, and pytest keeps three runs' worth). A failure keeps them.
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_family_built_for_one_size_says_so_at_input_size(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, "timm", "efficientformer_l1", {"all_but_last": 1}))
    result = invoke("validate", path)
    assert result.exit_code == 1, result.output
    assert "base.input_size: the model does not run on 64x64 inputs" in result.output
    assert "efficientformer_l1 is built for 224x224: leave base.input_size out" in result.output


def test_distilled_models_get_both_heads_fitted_to_the_classes(tmp_path):
    # LeViT averages a class head and a distillation head: replacing only the last one gave
    # `size of tensor a (1000) must match ... (10)` at inspect (exit 70).
    path = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, "timm", "levit_128s", {"all_but_last": 1}))
    out = _ok("inspect", path)
    assert "head head_dist.linear -> 10 classes" in out, out
    from tlcli.config.reading import load_recipe
    from tlcli.model.build import build_network

    network = build_network(load_recipe(path), [str(i) for i in range(10)], weights=False)
    assert network.model.get_submodule("head.linear").out_features == network.model.get_submodule("head_dist.linear").out_features == 10


def test_a_model_fx_cannot_trace_is_refused_at_base_model(tmp_path, monkeypatch):
    import torch

    from tlcli.model import tiny
    from tlcli.model.preprocess import Preprocess

    class DataDependent(torch.nn.Module):  # control flow on a value: fx cannot trace it
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 10)

        def forward(self, x):
            x = x.mean((2, 3))
            return self.fc(x) if x.sum() > 0 else self.fc(-x)

    small = Preprocess(32, 32, "squash", (0.5,) * 3, (0.5,) * 3, "bilinear")
    monkeypatch.setitem(tiny.TL_MODELS, "data_dependent", lambda: (DataDependent(), small))
    recipe = tiny_recipe(tmp_path, base={"model": "data_dependent"}, freeze={"until": "fc"})
    result = invoke("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1, result.output
    assert "base.model: torch.fx cannot trace data_dependent" in result.output, result.output
    assert "TraceError" in result.output and "Traceback" not in result.output
