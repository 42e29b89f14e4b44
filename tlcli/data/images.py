"""One image: any file (or a digit of the built-in set) decoded to uint8 CHW and fitted to the model's size.

Decoding is `torchvision.io` (libjpeg-turbo, libpng, libwebp) for what it reads,
PIL for the rest (BMP, TIFF, 16-bit and float modes); fitting resizes (and
centre-crops or pads) in uint8 with antialiasing, as timm's eval transforms do.
"""

from __future__ import annotations

import os
import warnings
from typing import Union

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tlcli.errors import DataError
from tlcli.model.preprocess import Preprocess

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they are
# still shipped and are what this pipeline is built and measured on. Told once
# here, not once per image.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

Source = Union[int, str]  # an index into the digits array, or an image path
# What torchvision.io decodes itself; everything else goes through PIL.
TORCHVISION_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}


def _digits_image(index: int, channels: int) -> torch.Tensor:
    from tlcli.data.sources import digits_arrays

    images, _ = digits_arrays()
    # Digits store ink intensity 0..16. They are rendered as a PNG of them comes out when written
    # the natural way, (x * 255 / 16).astype(uint8): white ink on black, the same uint8 pixels, so
    # that a user's own digit files are what the model was trained on.
    grey = torch.from_numpy((images[index] * 255 / 16).astype(np.uint8))
    return grey.unsqueeze(0).expand(channels, -1, -1).contiguous()


def _decode_file(path: str, channels: int) -> torch.Tensor:
    """uint8 CHW. torchvision for the formats it reads, PIL for the rest."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    if os.path.splitext(path)[1].lower() in TORCHVISION_SUFFIXES:
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.UNCHANGED)
        except (RuntimeError, ValueError):
            return _decode_with_pil(path, channels)  # PIL tries, and says what is wrong if it can't either
        if image.ndim == 4:  # an animated GIF or WebP: frames x C x H x W; the first frame, as viewers show it
            image = image[0]
        if image.dtype == torch.uint16:  # 16-bit PNG: scale, don't truncate
            image = (image.to(torch.int32) * 255 + 32767).div(65535, rounding_mode="floor").to(torch.uint8)
        if image.dtype == torch.uint8 and image.shape[0] in (1, 2, 3, 4):
            return _channels(image, channels)
    return _decode_with_pil(path, channels)


def _channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey, grey+alpha, RGB or RGBA (uint8) -> `channels` channels; alpha composited on white."""
    if image.shape[0] in (2, 4):
        alpha = image[-1:].float() / 255.0
        image = (image[:-1].float() * alpha + 255.0 * (1.0 - alpha)).round_().to(torch.uint8)
    if channels == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1).contiguous()
    if channels == 1 and image.shape[0] == 3:
        return TF.rgb_to_grayscale(image)
    return image


def _decode_with_pil(path: str, channels: int) -> torch.Tensor:
    try:
        from PIL import Image

        with Image.open(path) as im:
            arr = _pil_to_uint8(im, channels)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for bad files; all mean "unreadable"
        raise DataError(f"{path}: cannot read image: {err}") from None
    t = torch.from_numpy(np.array(arr))  # a writable copy: PIL's arrays are read-only
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t.unsqueeze(0)


def _pil_to_uint8(im, channels: int) -> np.ndarray:
    """8-bit pixels from any PIL mode: 16-bit and 32-bit integers are scaled by their
    range, floats are taken as [0, 1], palette, CMYK and alpha go through PIL's RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        scale = {"F": 1.0, "I": 65535.0 if a.max(initial=0) > 255 else 255.0}.get(im.mode, 65535.0)
        grey = np.clip(np.rint(a / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2) if channels == 3 else grey
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        from PIL import Image

        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white, as viewers show it
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)


def read_image(source: Source, channels: int = 3) -> torch.Tensor:
    """One image as uint8 CHW: a file, or an image of the digits array."""
    if isinstance(source, (int, np.integer)):
        return _digits_image(int(source), channels)
    return _decode_file(source, channels)


def fit_to_size(image: torch.Tensor, pp: Preprocess) -> torch.Tensor:
    """The image at the model's input size, as timm's eval transforms make it, keeping the dtype:
    `squash` resizes both edges to `resize` (the aspect ratio is not kept) and crops the centre;
    `center_crop` resizes the shorter edge to `resize` and crops the centre; `border` resizes
    the longer edge to `resize` and pads (with the mean colour) or crops to the size."""
    interp = InterpolationMode(pp.interpolation)
    if pp.mode == "squash":
        image = TF.resize(image, [pp.resize, pp.resize], interpolation=interp, antialias=True)
    elif pp.mode == "border":
        h, w = image.shape[-2:]
        scale = pp.resize / max(h, w)
        image = TF.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], interpolation=interp, antialias=True)
        image = _pad_to(image, pp.size, [round(255 * m) if image.dtype == torch.uint8 else m for m in pp.mean])
    else:
        image = TF.resize(image, [pp.resize], interpolation=interp, antialias=True)
    if tuple(image.shape[-2:]) == (pp.size, pp.size):
        return image
    return TF.center_crop(image, [pp.size, pp.size])


def _pad_to(image: torch.Tensor, size: int, fill: list) -> torch.Tensor:
    """Pad each edge shorter than `size` evenly on both sides (timm's CenterCropOrPad), per channel."""
    h, w = image.shape[-2:]
    top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
    bottom, right = max(size - h, 0) - top, max(size - w, 0) - left
    if not (top or bottom or left or right):
        return image
    out = torch.empty((*image.shape[:-2], h + top + bottom, w + left + right), dtype=image.dtype, device=image.device)
    for c in range(out.shape[-3]):
        out[..., c, :, :] = fill[c] if c < len(fill) else fill[0]
    out[..., top : top + h, left : left + w] = image
    return out


def load_sized(source: Source, pp: Preprocess) -> torch.Tensor:
    return fit_to_size(read_image(source, pp.channels), pp)
