"""The `zoo: tl` models: small networks registered like DL4J's zoo SimpleCNN.

`tiny_resnet` exists for fast tests of the graph logic: it has BatchNorm,
dropout and a residual add, so frozen-mode and skip-connection behaviour can
be checked in milliseconds. `simple_cnn` is the Keras blog's small CNN.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from tlcli.model.preprocess import Preprocess

_SMALL = Preprocess(32, 32, "squash", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(x + self.block(x))
        return self.fc(self.dropout(self.flatten(self.pool(x))))


class SimpleCNN(nn.Module):
    """conv32-relu-conv32-relu-maxpool-dropout-flatten-dense128-relu-dropout-dense."""

    def __init__(self, num_classes: int = 10, size: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(0.25)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * (size // 2) ** 2, 128)
        self.relu3 = nn.ReLU()
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.drop1(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.fc2(self.drop2(self.relu3(self.fc1(self.flatten(x)))))


TL_MODELS: dict[str, Callable[[], tuple[nn.Module, Preprocess]]] = {
    "tiny_resnet": lambda: (TinyResNet(), _SMALL),
    "simple_cnn": lambda: (SimpleCNN(), Preprocess(28, 28, "squash", (0.5,) * 3, (0.5,) * 3, "bilinear")),
}
