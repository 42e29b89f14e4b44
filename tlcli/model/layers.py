"""The modules surgery adds to a model: input preprocessor, merge vertices, activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlcli.model.preprocess import normalized


class InputAdapter(nn.Module):
    """DL4J's input preprocessors: grey -> RGB, resize to the model's size, normalise.

    The data pipeline then only scales pixels to [0, 1] at `input.size`; the
    model does the rest, so a checkpoint takes the raw images it was trained on.
    """

    def __init__(self, channels: int, size: int, mean, std, interpolation: str):
        super().__init__()
        self.channels = channels
        self.size = size
        self.mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        # Not persistent: constants of the model's preprocessing, not weights.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        # The feature cache's key hashes module reprs: every setting must show here.
        return (f"channels={self.channels}, size={self.size}, mode={self.mode}, "
                f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}")

    def forward(self, x):
        if self.channels == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return normalized(x, self.mean, self.std)


class Concat(nn.Module):
    """DL4J's MergeVertex: concatenate along channels/features."""

    def forward(self, *xs):
        return torch.cat(xs, dim=1)


class Sum(nn.Module):
    """DL4J's ElementWiseVertex(Add)."""

    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(dim=1), "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "identity": nn.Identity,
}


def init_layer(layer: nn.Module, init: str, generator: torch.Generator) -> None:
    """Fresh weights for a new or resized layer; biases start at zero."""
    weight = layer.weight
    if init == "xavier":
        nn.init.xavier_uniform_(weight, generator=generator)
    elif init == "kaiming":
        nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
    else:
        nn.init.normal_(weight, std=0.01, generator=generator)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
