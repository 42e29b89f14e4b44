"""The fx split: frontier tensors + trainable part == the full model; frozen stays frozen."""

import pytest
import torch

from tlcli.model.graph import ModelGraph, PinnedNet, frozen_extractor, split_at, trainable_part
from tlcli.model.tiny import TinyResNet
from tlcli.config.schema import BaseSpec, WeightsSpec
from tlcli.model.zoo import build_base


def _check_equivalence(model, zoo, boundary, size):
    torch.manual_seed(0)
    graph = ModelGraph.trace(model, zoo)
    split = split_at(graph, [graph.resolve(boundary)])
    x = torch.randn(2, 3, size, size)
    model.eval()
    with torch.no_grad():
        frontier = frozen_extractor(split)(x)
        out = trainable_part(split)(*frontier)
        full = model(x)
    torch.testing.assert_close(out, full, atol=1e-4, rtol=0)
    return split


def test_tiny_mid_block_boundary_has_two_frontier_tensors():
    split = _check_equivalence(TinyResNet(), "tl", "block.1", 16)
    # The skip connection crosses the cut: the stem output and block.1 both feed trainable nodes.
    assert split.frontier_names == ["stem.2", "block.1"]


@pytest.mark.parametrize("boundary,frontier", [("layer2.0.conv1", ["layer1.1.relu_1", "layer2.0.conv1"]), ("layer3", ["layer3.1.relu_1"])])
def test_resnet18_boundaries(boundary, frontier):
    base = build_base(BaseSpec(zoo="torchvision", model="resnet18", weights=WeightsSpec(name="none")))
    assert _check_equivalence(base.model, "torchvision", boundary, 64).frontier_names == frontier


@pytest.mark.real
@pytest.mark.parametrize("boundary", ["blocks.3", "conv_head", "global_pool"])
def test_embedded_lite0_boundaries(boundary):
    base = build_base(BaseSpec(zoo="timm", model="tf_efficientnet_lite0", weights=WeightsSpec(name="embedded")))
    _check_equivalence(base.model, "timm", boundary, 64)


def test_module_name_means_its_last_node():
    graph = ModelGraph.trace(TinyResNet(), "tl")
    assert graph.names[graph.resolve("block")] == "block.4"
    assert graph.resolve("nope") is None
    assert "did you mean 'block.1'" in graph.suggest("blok.1")


def test_frozen_bn_and_dropout_stay_in_eval_through_train():
    torch.manual_seed(0)
    model = TinyResNet()
    graph = ModelGraph.trace(model, "tl")
    split = split_at(graph, [graph.resolve("block.1")])
    transfer = PinnedNet(model, split.frozen_module_names())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("stem.", "block.0.", "block.1."))}
    trainable_bn_before = model.block[4].running_mean.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        transfer.train()  # what a training loop calls every epoch
        assert not model.stem[1].training and model.block[4].training and model.dropout.training
        loss = transfer(torch.randn(4, 3, 16, 16)).sum()
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.stem.parameters())
        optimizer.step()
    for k, v in model.state_dict().items():
        if k in frozen_before:
            assert torch.equal(v, frozen_before[k]), k  # params *and* BN running stats
    assert not torch.equal(model.block[4].running_mean, trainable_bn_before)  # the test can fail


# Equivalence over real architectures, through the whole recipe pipeline
# (prepare = trace + head replacement + split): the frontier tensors fed to the
# trainable subgraph give the full model's output, and no frozen parameter
# receives a gradient. Random weights are enough for torchvision models; Lite0
# uses the embedded ones.
EQUIVALENCE = {
    ("torchvision", "resnet18", "none"): ["layer1", "layer2.0.bn1", "layer3.1.relu_1", "avgpool"],
    ("torchvision", "vgg16", "none"): ["features.16", "features.23", "features.30", "classifier.3"],
    ("torchvision", "mobilenet_v3_small", "none"): ["features.2", "features.5.block.1", "features.12", "classifier.0"],
    ("timm", "tf_efficientnet_lite0", "embedded"): ["blocks.2", "blocks.5.1.bn2", "conv_head", "global_pool"],
}
# Boundaries inside a residual block: the skip connection crosses the cut.
MID_BLOCK = {"layer2.0.bn1", "features.5.block.1", "blocks.5.1.bn2"}
_built: dict = {}


def _prepared(zoo, model, weights, tmp_path_factory):
    from tlcli.config.schema import Recipe
    from tlcli.model.build import build_network

    if (zoo, model) not in _built:
        tmp = tmp_path_factory.mktemp(model)
        recipe = Recipe.model_validate({
            "base": {"zoo": zoo, "model": model, "weights": weights, "input_size": 64},
            "data": {"dataset": "digits"}, "output_dir": str(tmp / "run"), "fine_tune": {"seed": 0},
        })
        _built.clear()  # one big model in memory at a time
        _built[(zoo, model)] = (recipe, build_network(recipe, [str(i) for i in range(7)]))
    return _built[(zoo, model)]


@pytest.mark.real
@pytest.mark.parametrize("zoo,model,weights,boundary", [(*k, b) for k, bs in EQUIVALENCE.items() for b in bs],
                         ids=lambda v: v if isinstance(v, str) and v not in ("none", "embedded", "timm", "torchvision") else "")
def test_frontier_plus_trainable_equals_full_model_and_frozen_gets_no_gradient(zoo, model, weights, boundary, tmp_path_factory):
    from tlcli.config.schema import FreezeSpec

    recipe, base = _prepared(zoo, model, weights, tmp_path_factory)
    prepared = base.with_freeze(FreezeSpec(until=boundary))
    split = prepared.split
    assert len(split.frontier) == (2 if boundary in MID_BLOCK else 1), split.frontier_names
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    transfer = prepared.pinned().eval()
    extractor, trainable = prepared.extractor(), prepared.trainable()
    with torch.no_grad():
        full = transfer(x)
        via_frontier = trainable(*extractor(x))
    torch.testing.assert_close(via_frontier, full, atol=1e-4, rtol=0)

    transfer.train()
    transfer.zero_grad(set_to_none=True)
    with torch.no_grad():
        frontier = extractor(x)
    trainable(*frontier).logsumexp(1).sum().backward()
    frozen = set(split.frozen_state_names(prepared.model))
    params = dict(prepared.model.named_parameters())
    assert frozen and all(params[k].grad is None and not params[k].requires_grad for k in frozen if k in params)
    assert any(p.grad is not None for k, p in params.items() if k not in frozen)
    # And through the full model in training mode: the frozen part gets no gradient either.
    transfer.zero_grad(set_to_none=True)
    transfer(x).logsumexp(1).sum().backward()
    assert all(params[k].grad is None for k in frozen if k in params)


class _LayerScaleNet(torch.nn.Module):
    """A ConvNeXt-like block: its layer scale reaches the graph through a chain that does not
    depend on the input (`gamma.reshape(1, -1, 1, 1)`), and its layers are zoo subclasses of
    Linear, BatchNorm and Dropout (as timm's `Linear` is)."""

    class Linear(torch.nn.Linear):
        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class BatchNorm(torch.nn.BatchNorm2d):
        pass

    class Dropout(torch.nn.Dropout):
        pass

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.gamma = torch.nn.Parameter(torch.full((4,), 0.5))
        self.bn = self.BatchNorm(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = self.BatchNorm(4)
        self.drop = self.Dropout(0.5)
        self.fc = self.Linear(4, 3)

    def forward(self, x):
        x = self.bn(self.conv(x) * self.gamma.reshape(1, -1, 1, 1))
        x = self.bn2(self.conv2(x)).mean((2, 3))
        return self.fc(self.drop(x))


def test_a_parameter_used_through_a_constant_chain_is_frozen_with_its_block_and_featurizes():
    # convnext's `gamma.reshape` and swin's relative-position table gave `KeyError: reshape`
    # at featurize, and left such a parameter out of the frozen ones.
    model = _LayerScaleNet()
    split = _check_equivalence(model, "tl", "bn", 8)
    assert "gamma" in split.frozen_attr_names()
    assert "gamma" in split.frozen_state_names(model)
    PinnedNet(model, split.frozen_module_names(), split.frozen_attr_names())
    assert not model.gamma.requires_grad and model.conv2.weight.requires_grad


def test_zoo_subclasses_of_linear_batchnorm_and_dropout_stay_single_layers_that_keep_their_mode():
    model = _LayerScaleNet()
    graph = ModelGraph.trace(model, "tl")
    assert graph.classifier_layers() == ["fc"]  # the head and the probe find a Linear subclass
    split = split_at(graph, [graph.resolve("bn")])
    assert {"bn", "conv"} <= set(split.frozen_module_names())
    net = PinnedNet(model, split.frozen_module_names(), split.frozen_attr_names()).train()
    frozen_stats, trainable_stats = model.bn.running_mean.clone(), model.bn2.running_mean.clone()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    out = trainable_part(split)(*frozen_extractor(split)(x))
    # Traced through, the BN subclass would have its eval branch baked in: the trainable one
    # would never update its statistics and the dropout never drop.
    assert torch.equal(model.bn.running_mean, frozen_stats)
    assert not torch.equal(model.bn2.running_mean, trainable_stats)
    assert net.training and not torch.equal(out, trainable_part(split)(*frozen_extractor(split)(x)))


class _ViTLikeNet(torch.nn.Module):
    """What timm's ViT does around its blocks: optional forward arguments with defaults, a
    check on the input's shape, and a shape unpacked with one part unused."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, attn_mask=None, is_causal=False):
        torch._assert(x.shape[-1] == 4, "wrong width")
        batch, width = x.shape  # width unused
        x = self.a(x.reshape(batch, -1))
        if attn_mask is not None:
            x = x + attn_mask
        x = self.b(x) if not is_causal else x
        return self.fc(x)


def test_optional_arguments_and_input_checks_stay_out_of_the_cached_frontier():
    model = _ViTLikeNet().eval()
    graph = ModelGraph.trace(model, "tl")
    assert [n.target for n in graph.module.graph.nodes if n.op == "placeholder"] == ["x"]
    split = split_at(graph, [graph.resolve("a")])
    # Only the boundary is cached: not the image (read by the check), not None or False.
    assert split.frontier_names == ["a"]
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(trainable_part(split)(*frozen_extractor(split)(x)), model(x))
