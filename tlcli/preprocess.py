"""How a raw image becomes the model's input: size, crop, mean and std. Imports no torch.

The values always come from the model's own config (the embedded weights',
timm's `pretrained_cfg`, a torchvision enum's `transforms()`); a recipe can
only shrink the size for smoke runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Preprocess:
    """The modes are timm's eval crop modes. `squash` resizes both edges to `resize` (the
    aspect ratio is not kept) and crops the centre size x size; `center_crop` resizes the
    shorter edge to `resize` and crops the centre; `border` resizes the longer edge to
    `resize` and pads with the mean colour (or crops) to size x size."""

    size: int
    resize: int
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    channels: int = 3  # 1 when an input preprocessor in the model repeats grey to RGB

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def with_size(self, size: Optional[int]) -> "Preprocess":
        if size is None or size == self.size:
            return self
        return replace(self, size=size, resize=round(self.resize * size / self.size))
