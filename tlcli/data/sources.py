"""Data sources: which images, which labels, which split (reading them is the pipeline's job).

`dataset: digits` is scikit-learn's bundled `load_digits` (offline).
`imagefolder: PATH` is one folder per class, optionally pre-split into
train/ val/ test/; `csv: PATH` or `jsonl: PATH` a table of paths and labels (`data.table`). `dataset: flowers` downloads TensorFlow's flower_photos
archive once (`data.download`) and then reads it as an imagefolder. The
plan's fingerprint hashes every image's bytes, with `data.digests`
remembering the digests of files that did not change.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from tlcli.config.schema import DataSpec
from tlcli.data.digests import DigestIndex
from tlcli.data.download import FLOWERS_SHA256, FLOWERS_URL, download_flowers
from tlcli.data.table import read_table, table_of
from tlcli.errors import DataError, SpecError, did_you_mean
from tlcli.files import file_digest

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")

Source = Union[int, str]  # an index into the digits array, or an image path


@dataclass
class DataPlan:
    """The resolved data set: class names and, per split, (source, label) pairs."""

    kind: str  # "digits" or "files"
    class_names: list[str]
    splits: dict[str, list[tuple[Source, int]]]
    root: Optional[Path] = None
    index: Optional[Path] = None  # the digest index's file (beside the feature cache)
    on_disk: tuple[str, ...] = ()  # the splits the folder holds as train/ val/ test/ (none carved)
    table: Optional[Path] = None  # the CSV or JSON Lines file the rows came from
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def fingerprint(self) -> str:
        """A hash of everything about the data that determines features: the
        bytes of every image (not mtimes, which lie after a copy or checkout),
        labels, class names and split membership. Computed once per plan: it
        reads every image file."""
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def identity(self, decoder: str) -> dict:
        """What about the data determines a frozen part's features: its fingerprint, and which
        decoder read its JPEGs (nvjpeg and libjpeg-turbo differ by +-1; digits are not decoded)."""
        return {"data": self.fingerprint(), "decoder": decoder if self.kind == "files" else None}

    def _hash(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.kind, self.class_names)).encode())
        if self.table is not None:
            h.update(bytes.fromhex(file_digest(self.table)))
        if self.kind == "digits":
            images, _ = digits_arrays()
            h.update(images.tobytes())
        files = [s for pairs in self.splits.values() for s, _ in pairs]
        digests = DigestIndex(self.index).digests(files) if self.kind == "files" else {}
        for split in SPLITS:
            h.update(f"|{split}|".encode())
            for source, label in self.splits.get(split, []):
                h.update(f"{source}:{label};".encode("utf-8", "surrogateescape"))  # a non-UTF-8 name is its bytes
                if self.kind == "files":
                    h.update(bytes.fromhex(digests[source]))
        return h.hexdigest()


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def plan_data(spec: DataSpec, index: Optional[Path] = None) -> DataPlan:
    """Which images, which labels, which split. Problems raise `SpecError` under `data.`.

    `index`: where file digests are remembered between commands (beside the cache)."""
    if spec.dataset == "digits":
        _, target = digits_arrays()
        names = [str(i) for i in range(10)]
        pairs = [(i, int(t)) for i, t in enumerate(target)]
        pairs, names = _select_classes(spec, pairs, names)
        return DataPlan("digits", names, _split(spec, pairs))
    if spec.csv or spec.jsonl:
        plan = plan_table(spec)
        plan.index = index
        return plan
    root = Path(spec.imagefolder) if spec.imagefolder else download_flowers(
        spec.url or FLOWERS_URL, spec.sha256 if spec.url else FLOWERS_SHA256)
    plan = plan_imagefolder(spec, root)
    plan.index = index
    return plan


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
    """One folder per class, or pre-split into any of train/ val/ test/ (each one folder per
    class). A split that is not on disk is carved from train, seeded and stratified."""
    loc = ("data", "imagefolder") if spec.imagefolder else ("data", "dataset")
    if not root.is_dir():
        raise SpecError([(loc, f"{root} is not a directory")])
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        names = _class_dirs(root, loc)
        pairs, names = _select_classes(spec, _scan(root, root, names, loc), names)
        _check_classes(pairs, names, root, loc)
        return DataPlan("files", names, _split(spec, pairs), root)
    if "train" not in present:
        raise SpecError([(loc, f"{root} is pre-split ({', '.join(s + '/' for s in present)}) but has no train/")])
    names = _class_dirs(root / "train", loc)
    splits = {}
    for split in present:
        extra = sorted(set(_class_dirs(root / split, loc)) - set(names))
        if extra:
            raise SpecError([(loc, f"class '{extra[0]}' is in {split}/ but not in train/: tl cannot learn it")])
        pairs, kept = _select_classes(spec, _scan(root, root / split, names, loc), names)
        if not pairs:
            raise SpecError([(loc, f"{root / split} holds no images (extensions: {listed_extensions()})")])
        splits[split] = pairs
    _check_classes(splits["train"], kept, root / "train", loc)
    return DataPlan("files", kept, _carve_missing(spec, splits), root, on_disk=tuple(present))


def plan_table(spec: DataSpec) -> DataPlan:
    """A CSV or JSON Lines table's rows as an image folder's: classes sorted by name, and with
    a split column the splits it names (train required; a missing val or test carved from
    train, as for a folder pre-split on disk)."""
    table, loc = table_of(spec)
    rows = read_table(spec)
    root = Path(spec.root) if spec.root else table.parent
    if spec.split_column is None:
        names = sorted({r.label for r in rows})
        pairs, names = _select_classes(spec, _labelled(rows, names), names)
        _check_classes(pairs, names, table, loc)
        return DataPlan("files", names, _split(spec, pairs), root, table=table)
    present = [s for s in SPLITS if any(r.split == s for r in rows)]
    if "train" not in present:
        raise SpecError([(("data", "split_column"), f"{table}: no row is in train (its splits: {', '.join(present)})")])
    names = sorted({r.label for r in rows if r.split == "train"})
    splits = {}
    for split in present:
        extra = sorted({r.label for r in rows if r.split == split} - set(names))
        if extra:
            line = next(r.line for r in rows if r.split == split and r.label == extra[0])
            raise DataError(f"{table}:{line}: class '{extra[0]}' is in {split} but not in train: tl cannot learn it")
        splits[split], kept = _select_classes(spec, _labelled([r for r in rows if r.split == split], names), names)
    _check_classes(splits["train"], kept, table, loc)
    return DataPlan("files", kept, _carve_missing(spec, splits), root, on_disk=tuple(present), table=table)


def _labelled(rows: list, names: list[str]) -> list[tuple[Source, int]]:
    index = {name: i for i, name in enumerate(names)}
    return [(str(r.path), index[r.label]) for r in rows]


def require_every_class(plan: DataPlan, skipped: set[str]) -> None:
    """An error when every train image of some class was left out (unreadable, with
    data.on_bad_image: skip): a head would be trained that never saw that class."""
    left = np.bincount([label for source, label in plan.splits.get("train", []) if str(source) not in skipped],
                       minlength=len(plan.class_names))
    lost = [name for name, n in zip(plan.class_names, left) if n == 0]
    if lost:
        more = f" ({len(lost)} such classes)" if len(lost) > 1 else ""
        raise DataError(f"class '{lost[0]}' has no readable image in the train split (data.on_bad_image: skip left out "
                        f"every one){more}; fix or remove its files")


# Below this an ImageNet network's features start to fade (the digits quickstart: 0.962 at 112 px,
# 0.956 at 80, 0.947 at 64) while the time saved is a few seconds: the hint never goes lower.
HINT_FLOOR = 112


def size_hint(plan: DataPlan, input_size: int) -> Optional[str]:
    """A hint when the images are far smaller than the model's input: featurizing 8-px digits at
    224 px took 5.6x the time of 112 px, which scored higher. It stops at HINT_FLOOR."""
    if input_size <= HINT_FLOOR:
        return None
    sides = _typical_sides(plan)
    if not sides:
        return None
    side = int(np.median(sides))
    if side * 4 > input_size:
        return None
    smaller = max(HINT_FLOOR, input_size // 2)
    return (f"the images are about {side} px on their shorter side and are upscaled {input_size / side:.0f}x to "
            f"{input_size} px; base.input_size: {smaller} featurizes several times faster and may score as well "
            f"(on the digits quickstart, 112 px featurized 5.6x faster than 224 and scored higher)")


def _typical_sides(plan: DataPlan, samples: int = 24) -> list[int]:
    if plan.kind == "digits":
        return [8]
    from PIL import Image

    train = plan.splits.get("train", [])
    sides = []
    for source, _ in train[:: max(1, len(train) // samples)][:samples]:
        try:
            with Image.open(source) as im:  # reads the header only
                sides.append(min(im.size))
        except OSError:
            continue  # an unreadable file is reported where it is decoded
    return sides


def labelled_folder(folder: Path, class_names: list[str]) -> list[tuple[Source, int]]:
    """Another image folder, one subfolder per class, labelled with a run's class names
    (for `tl evaluate --data`). A subfolder the run has no class for is an error."""
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory (expected one subfolder of images per class)")
    unknown = [c for c in _class_dirs(folder, ()) if c not in class_names]
    if unknown:
        raise DataError(f"{folder / unknown[0]}: the run has no class '{unknown[0]}'{did_you_mean(unknown[0], class_names)} "
                        f"(its classes: {', '.join(class_names)})")
    try:
        pairs = _scan(folder, folder, class_names, ())
    except SpecError as err:
        raise DataError(str(err).lstrip(": ")) from None
    if not pairs:
        raise DataError(f"{folder}: no images in subfolders named after the run's classes (extensions: {listed_extensions()})")
    return pairs


def _carve_missing(spec: DataSpec, splits: dict) -> dict:
    if "test" not in splits:
        carved = _split(spec, splits["train"], with_test=True)
        return {**carved, **{k: v for k, v in splits.items() if k == "val"}}
    if "val" not in splits:
        carved = _split(spec, splits["train"], with_test=False)
        return {"train": carved["train"], "val": carved["val"], "test": splits["test"]}
    return splits


def _check_classes(pairs: list, names: list[str], folder: Path, loc: tuple) -> None:
    if not pairs:
        raise SpecError([(loc, f"no images found in {folder} (extensions: {listed_extensions()})")])
    counts = np.bincount([label for _, label in pairs], minlength=len(names))
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        raise SpecError([(loc, f"class '{empty[0]}' has no images in {folder}" + (f" ({len(empty)} empty classes)" if len(empty) > 1 else ""))])
    if len(names) < 2:
        raise SpecError([(loc, f"{folder} has {len(names)} class ({', '.join(names) or 'none'}); a classifier needs 2 or more")])


def listed_extensions() -> str:
    """The image file extensions tl reads, for a message."""
    return " ".join(sorted(IMAGE_EXTENSIONS))


def _hidden(path: Path) -> bool:
    """Dot files (macOS's AppleDouble `._x.png` among them) and macOS archive debris."""
    return _hidden_name(path.name)


def _hidden_name(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def visible_images(folder: Path) -> Iterator[Path]:
    """The image files under `folder`, recursively, in a stable order, hidden ones and
    anything inside a hidden folder left out."""
    return (Path(path) for path, _ in _visible_image_entries(folder))


def _visible_image_entries(folder: "Path | str") -> Iterator[tuple[str, bool]]:
    """visible_images as strings (`str(folder / name)`: scandir joins them), each with whether it
    is a symbolic link (known from the listing: no lstat)."""
    # One scandir per folder, entries in name order and each folder walked where its name
    # sorts: the order of sorted(rglob("*")), without a Path and a stat per file (8,192 files
    # took 0.3 s that way, a fifth of a cache hit's work; then a Path per name and per file
    # still took 40 of the 50 ms left: strings now, 11 ms). Like rglob, links to folders are not
    # followed, and a folder it could not list (unreadable, or gone meanwhile) is left out.
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if _hidden_name(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _visible_image_entries(entry.path)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            yield entry.path, entry.is_symlink()


def _class_dirs(folder: Path, loc: tuple) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p) and p.name not in SPLITS)


def _check_link(path: Path, root: Path, loc: tuple) -> None:
    """A link into the data folder itself would count its images twice, or loop."""
    if path.is_symlink():
        target, top = path.resolve(), root.resolve()
        if target == top or top in target.parents or target in top.parents:
            raise SpecError([(loc, f"{path} links back into the data folder ({target}); refusing to read images twice")])


def _scan(root: Path, folder: Path, names: list[str], loc: tuple) -> list[tuple[Source, int]]:
    pairs = []
    for label, name in enumerate(names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a class absent from val/ or test/ just has no images there
        _check_link(class_dir, root, loc)
        for path, link in _visible_image_entries(class_dir):
            if link:  # (an lstat per file otherwise: 50 ms for 8,192 files)
                _check_link(Path(path), root, loc)
            pairs.append((path, label))
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
    spec = data.split
    try:
        if data.limit and data.limit < len(pairs):
            pairs, _ = stratified_split(pairs, len(pairs) - data.limit, spec.seed)
        rest, test = stratified_split(pairs, math.ceil(spec.test * len(pairs)), spec.seed) if with_test else (pairs, [])
        out = {"test": test} if with_test else {}
        if spec.val > 0:
            val_share = spec.val / (1 - (spec.test if with_test else 0))
            train, val = stratified_split(rest, math.ceil(val_share * len(rest)), spec.seed)
        else:
            train, val = rest, []
    except ValueError as err:  # too few images per class for a stratified split
        raise SpecError([(("data", "split"), f"cannot split {len(pairs)} images: {err}")]) from None
    out.update(train=list(train), val=list(val))
    return {k: [(s, int(l)) for s, l in out[k]] for k in SPLITS if k in out}


def stratified_split(pairs: list, n_test: int, seed: int) -> tuple[list, list]:
    """(rest, test) with n_test items drawn per class in proportion, seeded.

    The same algorithm, and the same random draws, as scikit-learn's
    `train_test_split(..., stratify=labels, random_state=seed)`, so splits made
    before tl stopped importing scikit-learn (2.7 s of every command) are unchanged."""
    n_train = len(pairs) - n_test
    classes, y = np.unique([label for _, label in pairs], return_inverse=True)
    counts = np.bincount(y)
    if counts.min(initial=2) < 2:
        raise ValueError("the least populated class has only 1 image; a stratified split needs 2 per class")
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"each part needs at least one image per class ({len(classes)}), "
                         f"got {n_train} and {n_test}")
    by_class = np.split(np.argsort(y, kind="mergesort"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_train, rng)
    t_i = _approximate_mode(counts - n_i, n_test, rng)
    train, test = [], []
    for i in range(len(classes)):
        members = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return [pairs[i] for i in rng.permutation(train)], [pairs[i] for i in rng.permutation(test)]


def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of n_draws each class gets: floor of its share, the rest to the largest remainders (ties drawn)."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need -= add_now
            if need == 0:
                break
    return floored.astype(int)


