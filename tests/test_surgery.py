"""Graph surgery: n_out_replace, remove, remove_output_layers, add, outputs,
input preprocessors, freeze all_but_last / trainable, and their errors."""

import pytest
import torch
from torch import nn

from tlcli.errors import RecipeError
from tlcli.config.schema import Recipe
from tlcli.config.reading import parse_recipe
from tlcli.model.build import build_network

from conftest import tiny_recipe, write_recipe

CLASSES = [str(i) for i in range(10)]


def _recipe(tmp_path, model="tiny_resnet", **sections) -> Recipe:
    sections.setdefault("freeze", {"until": "stem" if model == "tiny_resnet" else "relu1"})
    r = tiny_recipe(tmp_path, base={"zoo": "tl", "model": model, "weights": "none"}, **sections)
    return Recipe.model_validate(r)


def _build(tmp_path, model="tiny_resnet", ops=(), **sections):
    return build_network(_recipe(tmp_path, model, surgery=list(ops), **sections), CLASSES)


def _untouched_equal(before: nn.Module, after: nn.Module, touched: set[str]) -> list[str]:
    """Names of untouched tensors, asserting each is bit-identical."""
    a, b = before.state_dict(), after.state_dict()
    checked = []
    for k, v in a.items():
        if k.rsplit(".", 1)[0] in touched or k not in b:
            continue
        assert torch.equal(v, b[k]), f"untouched {k} changed"
        checked.append(k)
    return checked


def _run(prepared, n=2):
    pp = prepared.preprocess
    with torch.no_grad():
        return prepared.model.eval()(torch.rand(n, pp.channels, pp.size, pp.size))


def test_n_out_replace_linear_relu_dropout_linear(tmp_path):
    plain = _build(tmp_path, "simple_cnn", head={"layer": "none"})
    op = {"n_out_replace": {"layer": "fc1", "n_out": 64, "init": "xavier", "init_next": "normal"}}
    edited = _build(tmp_path, "simple_cnn", [op], head={"layer": "none"})
    m = edited.model
    assert (m.fc1.in_features, m.fc1.out_features) == (32 * 14 * 14, 64)
    assert (m.fc2.in_features, m.fc2.out_features) == (64, 10)
    # init_next: normal(std 0.01), not the xavier of the first layer.
    assert m.fc2.weight.std().item() == pytest.approx(0.01, rel=0.2) and torch.all(m.fc2.bias == 0)
    checked = _untouched_equal(plain.model, m, {"fc1", "fc2"})
    assert {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"} <= set(checked)
    assert _run(edited).shape == (2, 10)


def test_n_out_replace_conv_bn_relu_conv(tmp_path):
    plain = _build(tmp_path)
    op = {"n_out_replace": {"layer": "block.0", "n_out": 12}}
    edited = _build(tmp_path, ops=[op])
    m = edited.model
    sub = m.get_submodule
    assert sub("block.0").out_channels == 12
    bn = sub("block.1")
    assert bn.num_features == 12 and torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert sub("block.3").in_channels == 12 and sub("block.3").out_channels == 8
    checked = _untouched_equal(plain.model, m, {"block.0", "block.1", "block.3"})
    assert {"stem.0.weight", "stem.1.running_mean", "block.4.weight", "fc.weight"} <= set(checked)
    assert _run(edited).shape == (2, 10)


def test_n_out_replace_carries_width_through_pool_and_flatten(tmp_path):
    edited = _build(tmp_path, "simple_cnn", [{"n_out_replace": {"layer": "conv2", "n_out": 16}}])
    assert edited.model.fc1.in_features == 16 * 14 * 14
    assert _run(edited).shape == (2, 10)


def test_n_out_replace_blocked_by_residual_add_names_the_node(tmp_path):
    text = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, surgery=[{"n_out_replace": {"layer": "stem.0", "n_out": 4}}]).model_dump(mode="json"))
    recipe = parse_recipe(text.read_text(), name="r.yaml")
    with pytest.raises(RecipeError) as err:
        build_network(recipe, CLASSES)
    message = str(err.value)
    assert "surgery.0.n_out_replace.layer" in message and "blocked at 'add'" in message
    assert message.startswith("r.yaml:")


def test_remove_keep_connections_rewires(tmp_path):
    plain = _build(tmp_path)
    edited = _build(tmp_path, ops=[{"remove": {"layer": "dropout", "keep_connections": True}}])
    assert "dropout" not in edited.graph.by_name and not hasattr(edited.model, "dropout")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(edited.model.eval()(x), plain.model.eval()(x), atol=0, rtol=0)


def test_remove_output_layers_then_add_new_predictions(tmp_path):
    ops = [
        {"remove_output_layers": 2},  # fc and dropout, like Keras pop() twice
        {"add": {"name": "hidden", "type": "linear", "inputs": ["flatten"], "n_out": 6, "activation": "relu"}},
        {"add": {"name": "predictions", "type": "linear", "inputs": ["hidden_act"]}},
        {"outputs": ["predictions"]},
    ]
    edited = _build(tmp_path, ops=ops)
    assert not hasattr(edited.model, "fc") and edited.head_layer == "predictions"
    assert edited.model.predictions.out_features == 10 and edited.model.hidden.in_features == 8
    assert edited.graph.node_names[-3:] == ["hidden", "hidden_act", "predictions"]
    assert _run(edited).shape == (2, 10)


def test_remove_without_connections_drops_downstream_until_outputs_set(tmp_path):
    ops = [
        {"remove": {"layer": "fc", "keep_connections": False}},
        {"add": {"name": "out", "type": "linear", "inputs": ["dropout"]}},
        {"outputs": ["out"]},
    ]
    edited = _build(tmp_path, ops=ops)
    assert "fc" not in edited.graph.by_name and edited.graph.node_names[-1] == "out"
    with pytest.raises(RecipeError, match="no output"):
        _build(tmp_path, ops=ops[:1])


def test_add_every_vertex_type(tmp_path):
    ops = [
        {"add": {"name": "side", "type": "conv1x1", "inputs": ["stem.2"], "n_out": 8, "activation": "gelu"}},
        {"add": {"name": "side_bn", "type": "batchnorm", "inputs": ["side_act"]}},
        {"add": {"name": "merged", "type": "add", "inputs": ["relu", "side_bn"]}},
        {"add": {"name": "act", "type": "activation", "inputs": ["merged"], "fn": "silu"}},
        {"add": {"name": "maxpool", "type": "pooling", "inputs": ["act"], "pool": "max", "kernel": 2}},
        {"add": {"name": "gap", "type": "pooling", "inputs": ["maxpool"], "pool": "adaptive_avg"}},
        {"add": {"name": "flat", "type": "flatten", "inputs": ["gap"]}},
        {"add": {"name": "both", "type": "concat", "inputs": ["flat", "flatten"]}},
        {"add": {"name": "drop", "type": "dropout", "inputs": ["both"], "p": 0.3}},
        {"add": {"name": "predictions", "type": "linear", "inputs": ["drop"], "lr": 0.05}},
        {"outputs": ["predictions"]},
    ]
    edited = _build(tmp_path, ops=ops)
    assert edited.model.predictions.in_features == 16  # 8 from the new branch + 8 from the old pooled features
    assert isinstance(edited.model.side_bn, nn.BatchNorm2d) and edited.model.drop.p == 0.3
    assert edited.layer_lr == {"predictions": 0.05}
    assert _run(edited).shape == (2, 10)
    assert "fc" not in edited.graph.by_name  # the old head is dead code now, and gone


def test_add_shape_errors_say_what_to_do(tmp_path):
    with pytest.raises(RecipeError, match="flat input.*8×32×32.*flatten or pooling"):
        _build(tmp_path, ops=[{"add": {"name": "extra", "type": "linear", "inputs": ["stem.2"]}}])
    with pytest.raises(RecipeError, match="one shape"):
        _build(tmp_path, ops=[{"add": {"name": "extra", "type": "add", "inputs": ["stem.2", "flatten"]}}])


def test_bad_names_in_every_operation_are_reported_at_validation(tmp_path, cli):
    recipe = tiny_recipe(tmp_path, surgery=[
        {"n_out_replace": {"layer": "blok.0", "n_out": 4}},
        {"remove": {"layer": "dropot", "keep_connections": True}},
        {"add": {"name": "new", "type": "linear", "inputs": ["flaten"]}},
        {"outputs": ["fcc"]},
    ], freeze={"until": "stem", "trainable": ["blocc"]}, fine_tune={"layer_lr": {"stm": 0.1}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    code, out = cli("validate", path)
    assert code == 1 and "Traceback" not in out
    for fragment in ("surgery.0.n_out_replace.layer: unknown layer 'blok.0'; did you mean 'block.0'",
                     "surgery.1.remove.layer: unknown node 'dropot'; did you mean 'dropout'",
                     "surgery.2.add.inputs.0: unknown node 'flaten'; did you mean 'flatten'",
                     "surgery.3.outputs.0: unknown node 'fcc'; did you mean 'fc'",
                     "freeze.trainable.0: unknown layer 'blocc'; did you mean 'block'",
                     "fine_tune.layer_lr.stm: unknown layer 'stm'; did you mean 'stem'"):
        assert fragment in out, out
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_input_preprocessor_takes_grey_images_at_their_own_size(tmp_path):
    edited = _build(tmp_path, "simple_cnn", input={"channels": 1, "size": 8})
    pp = edited.preprocess
    assert (pp.channels, pp.size, pp.mean, pp.std) == (1, 8, (0.0,), (1.0,))
    grey = torch.rand(2, 1, 8, 8)
    plain = _build(tmp_path, "simple_cnn")
    rgb = nn.functional.interpolate(grey.repeat(1, 3, 1, 1), size=(28, 28), mode="bilinear", antialias=True)
    with torch.no_grad():
        torch.testing.assert_close(edited.model.eval()(grey), plain.model.eval()((rgb - 0.5) / 0.5), atol=1e-5, rtol=0)
    assert edited.graph.node_names[0] == "input_adapter"


def test_freeze_all_but_last_counts_weight_layers(tmp_path):
    p = _build(tmp_path, "simple_cnn", freeze={"until": None, "all_but_last": 2})
    frozen = set(p.split.frozen_module_names())
    assert frozen == {"conv1", "relu1", "conv2", "relu2", "pool", "drop1", "flatten"}
    assert p.split.frontier_names == ["flatten"]
    assert _build(tmp_path, "simple_cnn", freeze={"until": None, "all_but_last": 4}).split.frontier_names == ["x"]


def test_freeze_trainable_overrides_and_pins_the_rest(tmp_path):
    p = _build(tmp_path, freeze={"until": "pool", "trainable": ["block.1"]})
    transfer = p.pinned()
    grads = {n for n, q in transfer.net.named_parameters() if q.requires_grad}
    assert grads == {"block.1.weight", "block.1.bias", "fc.weight", "fc.bias"}
    # The cache stops above the trainable BN; block.3/4 are frozen but run in the trainable part.
    assert p.split.frontier_names == ["stem.2", "block.0"]
    transfer.train()
    sub = transfer.net.get_submodule
    assert sub("block.4").training is False and sub("block.1").training is True


def test_input_preprocessor_settings_enter_the_cache_key(tmp_path):
    from tlcli.data.sources import plan_data
    from tlcli.engine.cache import cache_key
    from tlcli.engine.features import key_components

    def key(**base):
        # tiny_resnet pools adaptively, so it runs at either size (simple_cnn's Linear fits 28 px only).
        r = _recipe(tmp_path, "tiny_resnet", input={"channels": 1, "size": 8})
        r = r.model_copy(update={"base": r.base.model_copy(update=base)})
        p = build_network(r, CLASSES)
        return cache_key(key_components(p, plan_data(r.data), p.extractor(), r.cache.dtype, precision="fp32"))

    # Same data-side preprocessing (grey 8x8); only the size the model resizes to differs.
    assert key() != key(input_size=48)


def test_an_inherited_freeze_is_reported_once_at_the_line_that_wrote_it(tmp_path, cli):
    """Stages without their own freeze inherit the top-level one: a bad name there is
    one problem at `freeze.until`'s own line, not one per stage at the stages' lines."""
    stages = [{"name": "a", "epochs": 1}, {"name": "b", "epochs": 1}, {"name": "c", "freeze": {"until": "stm"}}]
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, freeze={"until": "blok.1"}, stages=stages))
    lines = path.read_text().splitlines()
    top = next(i for i, l in enumerate(lines, 1) if "blok.1" in l)
    own = next(i for i, l in enumerate(lines, 1) if "stm" in l)
    code, out = cli("validate", path)
    errors = [l for l in out.splitlines() if l.startswith("error:")]
    assert code == 1 and len(errors) == 2, out
    assert errors[0].startswith(f"error: {path}:{top}: freeze.until: unknown node 'blok.1'; did you mean 'block.1'")
    assert errors[1].startswith(f"error: {path}:{own}: stages.2.freeze.until: unknown node 'stm'; did you mean 'stem'")
