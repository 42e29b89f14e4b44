"""Preprocessing: how a raw image becomes the model's input (size, crop, mean, std), with its bounds. Imports no torch.

The values always come from the model's own config (the embedded weights',
timm's `pretrained_cfg`, a torchvision enum's `transforms()`); a recipe can
only shrink the size for smoke runs. The same record is saved in a run's
`checkpoint.json` and parsed back with these bounds.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from pydantic import ConfigDict, Field, TypeAdapter, model_validator
from pydantic.dataclasses import dataclass

Mode = Literal["squash", "center_crop", "border"]
Interpolation = Literal["nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos"]


# A pydantic dataclass: built positionally in code, validated with these bounds when read from a checkpoint.
@dataclass(frozen=True, config=ConfigDict(allow_inf_nan=False))
class Preprocess:
    """The modes are timm's eval crop modes. `squash` resizes both edges to `resize` (the
    aspect ratio is not kept) and crops the centre size x size; `center_crop` resizes the
    shorter edge to `resize` and crops the centre; `border` resizes the longer edge to
    `resize` and pads with the mean colour (or crops) to size x size."""

    size: Annotated[int, Field(ge=1, le=4096)]
    resize: Annotated[int, Field(ge=1, le=8192)]
    mode: Mode
    mean: Annotated[tuple[Annotated[float, Field(ge=-1e3, le=1e3)], ...], Field(min_length=1, max_length=3)]
    std: Annotated[tuple[Annotated[float, Field(gt=0, le=1e3)], ...], Field(min_length=1, max_length=3)]
    interpolation: Interpolation
    channels: Literal[1, 3] = 3  # 1 when an input preprocessor in the model repeats grey to RGB

    @model_validator(mode="after")
    def _one_value_per_channel(self) -> "Preprocess":
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.channels):
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        return self

    def to_dict(self) -> dict:
        return _ADAPTER.dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return _ADAPTER.validate_python(d)

    def with_size(self, size: Optional[int]) -> "Preprocess":
        if size is None or size == self.size:
            return self
        return dataclasses.replace(self, size=size, resize=round(self.resize * size / self.size))


_ADAPTER = TypeAdapter(Preprocess)


def normalized(x, mean, std):
    """(pixels in [0, 1] - mean) / std: the one normalisation, in one order, wherever it runs (the
    pipeline, an exported model, an input preprocessor), so that all three give the same floats.
    uint8 pixels are divided by 255 first. Tensors in, a new tensor out (no torch import here)."""
    x = x.float() if x.is_floating_point() else x.float().div(255.0)
    return x.sub(mean).div(std)
