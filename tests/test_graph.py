"""The fx split: frontier tensors + trainable part == the full model; frozen stays frozen."""

import pytest
import torch

from tlcli.graph import ModelGraph, TransferModel, frozen_extractor, split_at, trainable_part
from tlcli.models import TinyResNet
from tlcli.recipe import BaseSpec, WeightsSpec
from tlcli.zoo import build_base


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
    transfer = TransferModel(model, split.frozen_module_names())
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
