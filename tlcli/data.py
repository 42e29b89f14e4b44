"""Data: which images, which labels, which split; and how one image is read.

`dataset: digits` is scikit-learn's bundled `load_digits` (offline).
`imagefolder: PATH` is one folder per class, optionally pre-split into
train/ val/ test/. `dataset: flowers` downloads TensorFlow's flower_photos
archive once and then reads it as an imagefolder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tlcli.errors import DataError, SpecError, did_you_mean
from tlcli.files import file_digest
from tlcli.preprocess import Preprocess
from tlcli.recipe import DataSpec

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"

Source = Union[int, str]  # an index into the digits array, or an image path


@dataclass
class DataPlan:
    """The resolved data set: class names and, per split, (source, label) pairs."""

    kind: str  # "digits" or "files"
    class_names: list[str]
    splits: dict[str, list[tuple[Source, int]]]
    root: Optional[Path] = None
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """A hash of everything about the data that determines features: the
        bytes of every image (not mtimes, which lie after a copy or checkout),
        labels, class names and split membership. Computed once per plan: it
        reads every image file."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.kind, self.class_names)).encode())
        if self.kind == "digits":
            images, _ = _digits()
            h.update(images.tobytes())
        for split in SPLITS:
            h.update(f"|{split}|".encode())
            for source, label in self.splits.get(split, []):
                h.update(f"{source}:{label};".encode())
                if self.kind == "files":
                    h.update(_image_digest(source))
        return h.hexdigest()


def _image_digest(path: str) -> bytes:
    try:
        return bytes.fromhex(file_digest(path))
    except OSError as err:
        raise DataError(f"{path}: cannot read image: {err.strerror or err}") from None


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def plan_data(spec: DataSpec) -> DataPlan:
    """Which images, which labels, which split. Problems raise `SpecError` under `data.`."""
    if spec.dataset == "digits":
        _, target = _digits()
        names = [str(i) for i in range(10)]
        pairs = [(i, int(t)) for i, t in enumerate(target)]
        pairs, names = _select_classes(spec, pairs, names)
        return DataPlan("digits", names, _split(spec, pairs))
    root = Path(spec.imagefolder) if spec.imagefolder else download_flowers(spec.url or FLOWERS_URL)
    return plan_imagefolder(spec, root)


FLOWER_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def class_names_for(spec: DataSpec) -> list[str]:
    """The class names, without downloading or hashing anything (for validate
    and inspect, which only need the head's width)."""
    if spec.classes:
        return list(spec.classes)
    if spec.dataset == "digits":
        return [str(i) for i in range(10)]
    if spec.dataset == "flowers":
        return FLOWER_CLASSES
    return plan_data(spec).class_names


def plan_imagefolder(spec: DataSpec, root: Path) -> DataPlan:
    loc = ("data", "imagefolder") if spec.imagefolder else ("data", "dataset")
    if not root.is_dir():
        raise SpecError([(loc, f"{root} is not a directory")])
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    if presplit:
        names = _class_dirs(root / "train")
        splits: dict[str, list[tuple[Source, int]]] = {}
        for split in SPLITS:
            if (root / split).is_dir():
                splits[split] = _scan(root / split, names, loc)
        pairs_all = [p for s in splits.values() for p in s]
        if not pairs_all:
            raise SpecError([(loc, f"no images found in {root} (extensions: {_exts()})")])
        pairs_train, names_kept = _select_classes(spec, splits["train"], names)
        out = {"train": pairs_train}
        for split in ("val", "test"):
            if split in splits:
                out[split], _ = _select_classes(spec, splits[split], names)
        if "val" not in out:
            # Carve val from train, seeded and stratified, as for an unsplit folder.
            carved = _split(spec, out["train"], with_test=False)
            out["train"], out["val"] = carved["train"], carved["val"]
        return DataPlan("files", names_kept, out, root)
    names = _class_dirs(root)
    if not names:
        raise SpecError([(loc, f"no class folders in {root}: expected one folder per class")])
    pairs = _scan(root, names, loc)
    if not pairs:
        raise SpecError([(loc, f"no images found in {root} (extensions: {_exts()})")])
    pairs, names = _select_classes(spec, pairs, names)
    return DataPlan("files", names, _split(spec, pairs), root)


def _exts() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path, names: list[str], loc: tuple) -> list[tuple[Source, int]]:
    pairs = []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            raise SpecError([(loc, f"{root} lacks the class folder '{name}' that train/ has")])
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                pairs.append((str(path), label))
    return pairs


def _select_classes(spec: DataSpec, pairs, names):
    wanted = spec.classes
    if not wanted:
        return pairs, names
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise SpecError([
            (("data", "classes"), f"unknown class '{c}'{did_you_mean(c, names)} (classes: {', '.join(names)})")
            for c in unknown
        ])
    remap = {names.index(c): i for i, c in enumerate(wanted)}
    return [(s, remap[l]) for s, l in pairs if l in remap], list(wanted)


def _split(data: DataSpec, pairs, with_test: bool = True) -> dict[str, list[tuple[Source, int]]]:
    from sklearn.model_selection import train_test_split

    spec = data.split
    labels = [l for _, l in pairs]
    if data.limit and data.limit < len(pairs):
        pairs, _ = train_test_split(pairs, train_size=data.limit, stratify=labels, random_state=spec.seed)
        labels = [l for _, l in pairs]
    try:
        rest, test = (train_test_split(pairs, test_size=spec.test, stratify=labels, random_state=spec.seed)
                      if with_test else (pairs, []))
        out = {"test": test} if with_test else {}
        if spec.val > 0:
            rest_labels = [l for _, l in rest]
            val_share = spec.val / (1 - (spec.test if with_test else 0))
            train, val = train_test_split(rest, test_size=val_share, stratify=rest_labels, random_state=spec.seed)
        else:
            train, val = rest, []
    except ValueError as err:  # too few images per class for a stratified split
        raise SpecError([(("data", "split"), f"cannot split {len(pairs)} images: {err}")]) from None
    out.update(train=list(train), val=list(val))
    return {k: [(s, int(l)) for s, l in out[k]] for k in SPLITS if k in out}


# --------------------------------------------------------------------------- reading images


def read_image(source: Source, channels: int = 3) -> torch.Tensor:
    """One image as float32 RGB (or grey, channels=1), CHW, in [0, 1]."""
    if isinstance(source, int):
        images, _ = _digits()
        # Digits store ink intensity 0..16; as a photo that is dark ink on white.
        grey = 1.0 - torch.from_numpy(images[source]) / 16.0
        return grey.unsqueeze(0).expand(channels, -1, -1).contiguous()
    try:
        from PIL import Image

        with Image.open(source) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as err:  # PIL raises many types for bad files; all mean "unreadable"
        raise DataError(f"{source}: cannot read image: {err}") from None
    t = torch.from_numpy(arr.copy())
    t = t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)
    return t.float().div_(255.0)


def apply_preprocess(image: torch.Tensor, pp: Preprocess, normalize: bool = True) -> torch.Tensor:
    interp = InterpolationMode(pp.interpolation)
    if pp.mode == "squash":
        image = TF.resize(image, [pp.size, pp.size], interpolation=interp, antialias=True)
    else:
        image = TF.resize(image, [pp.resize], interpolation=interp, antialias=True)
        image = TF.center_crop(image, [pp.size, pp.size])
    return TF.normalize(image, list(pp.mean), list(pp.std)) if normalize else image


def augmentation(spec, pp: Preprocess):
    """The recipe's augmentation as a transforms.v2 pipeline on a [0, 1] image
    already at the model's input size (before normalisation)."""
    from torchvision.transforms import v2

    steps = []
    if spec.random_resized_crop is not None:
        c = spec.random_resized_crop
        steps.append(v2.RandomResizedCrop(
            [pp.size, pp.size], scale=tuple(c.scale), ratio=tuple(c.ratio),
            interpolation=InterpolationMode(pp.interpolation), antialias=True,
        ))
    if spec.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(spec.hflip))
    if spec.color_jitter is not None:
        j = spec.color_jitter
        steps.append(v2.ColorJitter(brightness=j.brightness, contrast=j.contrast, saturation=j.saturation, hue=j.hue))
    return v2.Compose(steps)


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[tuple[Source, int]], pp: Preprocess, augment=None):
        self.pairs = pairs
        self.pp = pp
        self.augment = augment

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        source, label = self.pairs[i]
        image = read_image(source, self.pp.channels)
        if self.augment is None:
            return apply_preprocess(image, self.pp), label
        image = apply_preprocess(image, self.pp, normalize=False)
        image = self.augment(image).clamp_(0.0, 1.0)
        return TF.normalize(image, list(self.pp.mean), list(self.pp.std)), label


def loader(
    pairs, pp: Preprocess, batch_size: int, num_workers: int,
    augment=None, generator: Optional[torch.Generator] = None,
) -> torch.utils.data.DataLoader:
    """Batches of preprocessed images; shuffled (and augmented) when a
    generator is given, which makes the order reproducible."""
    return torch.utils.data.DataLoader(
        ImageDataset(pairs, pp, augment), batch_size=batch_size, shuffle=generator is not None,
        num_workers=num_workers, generator=generator,
    )


# --------------------------------------------------------------------------- flowers download


def data_home() -> Path:
    return Path(os.environ.get("TL_DATA_HOME", Path.home() / ".cache" / "tl" / "datasets"))


def download_flowers(url: str) -> Path:
    """Download and extract flower_photos once; extraction refuses path traversal."""
    target = data_home() / "flower_photos"
    if (target / ".complete").exists():
        return target
    data_home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_home()) as tmp:
        archive = Path(tmp) / "flower_photos.tgz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as err:
            raise DataError(
                f"cannot download {url} ({getattr(err, 'reason', err)}). Offline, extract flower_photos.tgz "
                f"so that {target}/<class>/ holds the images and create {target}/.complete, "
                f"or use imagefolder: PATH"
            ) from None
        extract_dir = Path(tmp) / "extract"
        safe_extract(archive, extract_dir)
        inner = extract_dir / "flower_photos"
        if not inner.is_dir():
            raise DataError(f"{url}: archive has no flower_photos/ folder")
        if target.exists():
            shutil.rmtree(target)
        os.replace(inner, target)
    (target / ".complete").touch()
    return target


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing absolute paths, `..`, links out and devices."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.FilterError, tarfile.TarError, OSError) as err:
        raise DataError(f"{archive}: refusing to extract: {err}") from None
