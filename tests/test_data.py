"""Data sources: digits, imagefolder (split or pre-split), flowers download, safe extraction."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tlcli.data.sources import plan_data, stratified_split
from tlcli.data.download import safe_extract
from tlcli.data.pipeline import read_image
from tlcli.errors import DataError
from tlcli.config.schema import Recipe

from conftest import LocalServer, make_imagefolder, tiny_recipe


def recipe_for(tmp_path, **data):
    r = tiny_recipe(tmp_path)
    r["data"] = {"split": {"val": 0.2, "test": 0.2, "seed": 0}, **data}
    return Recipe.model_validate(r)


def test_digits_split_is_stratified_and_seeded(tmp_path):
    plan = plan_data(Recipe.model_validate(tiny_recipe(tmp_path, data={"limit": None})).data)
    sizes = {k: len(v) for k, v in plan.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 360
    again = plan_data(Recipe.model_validate(tiny_recipe(tmp_path, data={"limit": None})).data)
    assert again.splits == plan.splits
    splits = [set(s for s, _ in v) for v in plan.splits.values()]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])


def test_the_built_in_digits_are_the_pixels_of_a_png_a_user_writes_of_them(tmp_path):
    """Rendered dark-on-white, the model learnt digits that a user's own PNGs of them (written the
    natural way, white ink on black) are not: it got 3 of 6 wrong at probability 1.0."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in (0, 1, 1796):
        Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")).save(tmp_path / f"{i}.png")
        built_in = read_image(i)
        from_file = read_image(str(tmp_path / f"{i}.png"))
        assert built_in.dtype == from_file.dtype and built_in.shape == from_file.shape == (3, 8, 8)
        assert (built_in == from_file).all()
        assert built_in[0, 0, 0] == 0 and built_in.max() > 200  # black background, white ink
        assert np.array_equal(built_in[0].numpy(), np.asarray(Image.open(tmp_path / f"{i}.png")))


def test_imagefolder_unsplit(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=10)
    plan = plan_data(recipe_for(tmp_path, imagefolder=str(root)).data)
    assert plan.class_names == ["a", "b", "c"]
    assert sum(len(v) for v in plan.splits.values()) == 30 and len(plan.splits["test"]) == 6


def test_imagefolder_presplit_without_val_carves_it_from_train(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=10, split_dirs=["train", "test"])
    plan = plan_data(recipe_for(tmp_path, imagefolder=str(root)).data)
    assert all("/test/" in s for s, _ in plan.splits["test"]) and len(plan.splits["test"]) == 30
    assert len(plan.splits["train"]) + len(plan.splits["val"]) == 30
    assert all("/train/" in s for s, _ in plan.splits["val"])


def test_class_selection_relabels_in_given_order(tmp_path):
    plan = plan_data(Recipe.model_validate(tiny_recipe(tmp_path, data={"classes": [7, 3]})).data)
    assert plan.class_names == ["7", "3"]
    assert {l for _, l in plan.splits["train"]} == {0, 1}


def _flowers_tgz(tmp_path, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    served = tmp_path / "srv"
    served.mkdir(exist_ok=True)
    (served / "flower_photos.tgz").write_bytes(buf.getvalue())
    return served


def test_flowers_download_from_local_server(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_DATA_HOME", str(tmp_path / "data"))
    src = make_imagefolder(tmp_path / "src", classes=("daisy", "roses"), per_class=10)
    members = {f"flower_photos/{p.parent.name}/{p.name}": p.read_bytes() for p in src.rglob("*.png")}
    members["flower_photos/LICENSE.txt"] = b"license"
    served = _flowers_tgz(tmp_path, members)
    sha = hashlib.sha256((served / "flower_photos.tgz").read_bytes()).hexdigest()  # a mirror is always pinned
    with LocalServer(served) as srv:
        plan = plan_data(recipe_for(tmp_path, dataset="flowers", url=f"{srv.url}/flower_photos.tgz", sha256=sha).data)
    assert plan.class_names == ["daisy", "roses"] and sum(len(v) for v in plan.splits.values()) == 20
    # Second time: no server needed.
    plan = plan_data(recipe_for(tmp_path, dataset="flowers", url="http://127.0.0.1:9/x.tgz", sha256=sha).data)
    assert plan.class_names == ["daisy", "roses"]


def test_flowers_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_DATA_HOME", str(tmp_path / "data"))
    with pytest.raises(DataError, match="Offline, extract flower_photos.tgz"):
        plan_data(recipe_for(tmp_path, dataset="flowers", url="http://127.0.0.1:9/flower_photos.tgz", sha256="0" * 64).data)


def test_extraction_refuses_parent_traversal(tmp_path):
    served = _flowers_tgz(tmp_path, {"../escape.txt": b"gotcha", "flower_photos/a/x.png": b"x"})
    with pytest.raises(DataError, match="refusing to extract"):
        safe_extract(served / "flower_photos.tgz", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_extraction_keeps_absolute_paths_inside(tmp_path):
    target = tmp_path / "abs-escape.txt"
    served = _flowers_tgz(tmp_path, {str(target): b"gotcha"})
    safe_extract(served / "flower_photos.tgz", tmp_path / "out")
    assert not target.exists()
    assert (tmp_path / "out" / str(target).lstrip("/")).read_bytes() == b"gotcha"


@pytest.mark.parametrize("n,classes,test,seed", [(1797, 10, 0.25, 0), (200, 10, 0.2, 3), (57, 3, 0.3, 1), (31, 2, 0.5, 7)])
def test_stratified_split_equals_scikit_learns(n, classes, test, seed):
    """tl no longer imports scikit-learn to split; the splits it made before must not change."""
    import math

    import numpy as np
    from sklearn.model_selection import train_test_split

    labels = np.random.RandomState(seed).randint(0, classes, n).tolist()
    labels += list(range(classes)) * 2  # every class has two members at least
    pairs = [(f"img{i}.png", l) for i, l in enumerate(labels)]
    expected = train_test_split(pairs, test_size=test, stratify=labels, random_state=seed)
    assert stratified_split(pairs, math.ceil(test * len(pairs)), seed) == tuple(map(list, expected))


def test_stratified_split_refuses_a_class_with_one_image():
    with pytest.raises(ValueError, match="only 1 image"):
        stratified_split([("a", 0), ("b", 0), ("c", 1)], 1, 0)


# --------------------------------------------------------------------------- a corpus of bad data folders
# One folder per class of fault; each with the outcome a user should get.


def _fit_data(tmp_path, cli, data):
    from conftest import write_recipe

    r = tiny_recipe(tmp_path, fine_tune={"epochs": 1})
    r["data"] = {"split": {"val": 0.2, "test": 0.2, "seed": 0}, **data}
    return cli("fit", write_recipe(tmp_path / "r.yaml", r))


def test_presplit_is_detected_from_train_and_val_without_test(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=10, split_dirs=["train", "val"])
    plan = plan_data(recipe_for(tmp_path, imagefolder=str(root)).data)
    assert plan.class_names == ["a", "b", "c"]  # not ['train', 'val']
    assert all("/val/" in s for s, _ in plan.splits["val"]) and all("/train/" in s for s, _ in plan.splits["test"])


@pytest.mark.parametrize("junk", ["__MACOSX/a/._0.png", "a/._0.png", ".hidden/x.png", "a/.thumbs/x.png"])
def test_hidden_files_and_macos_debris_are_skipped(tmp_path, junk):
    root = make_imagefolder(tmp_path / "imgs", per_class=10)
    (root / junk).parent.mkdir(parents=True, exist_ok=True)
    (root / junk).write_bytes(b"not an image")
    plan = plan_data(recipe_for(tmp_path, imagefolder=str(root)).data)
    assert plan.class_names == ["a", "b", "c"] and sum(len(v) for v in plan.splits.values()) == 30


@pytest.mark.parametrize("fault,fragment", [
    ("one_class", "has 1 class (a); a classifier needs 2 or more"),
    ("empty_class", "class 'c' has no images"),
    ("class_only_in_test", "class 'd' is in test/ but not in train/"),
    ("empty_test", "test holds no images"),
    ("link_to_root", "links back into the data folder"),
    ("image_linked_twice", "links back into the data folder"),
])
def test_bad_data_folders_are_errors_that_say_what_is_wrong(tmp_path, cli, fault, fragment):
    import os

    if fault == "one_class":
        root = make_imagefolder(tmp_path / "imgs", classes=("a",), per_class=10)
    elif fault == "empty_class":
        root = make_imagefolder(tmp_path / "imgs", per_class=10)
        for f in (root / "c").iterdir():
            f.unlink()
    elif fault == "class_only_in_test":
        root = make_imagefolder(tmp_path / "imgs", per_class=6, split_dirs=["train", "test"])
        make_imagefolder(root / "test", classes=("d",), per_class=3)
    elif fault == "empty_test":
        root = make_imagefolder(tmp_path / "imgs", per_class=6, split_dirs=["train"])
        (root / "test" / "a").mkdir(parents=True)
    elif fault == "link_to_root":
        root = make_imagefolder(tmp_path / "imgs", per_class=10)
        os.symlink(root, root / "d")
    else:  # one image of a/ again in b/, through a link to it: it would be counted twice
        root = make_imagefolder(tmp_path / "imgs", per_class=10)
        os.symlink(sorted((root / "a").iterdir())[0], root / "b" / "twin.png")
    code, out = _fit_data(tmp_path, cli, {"imagefolder": str(root)})
    assert code == 1 and fragment in out and "data.imagefolder" in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unreadable_images_follow_the_recipes_policy(tmp_path, cli, policy):
    root = make_imagefolder(tmp_path / "imgs", per_class=10)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    code, out = _fit_data(tmp_path, cli, {"imagefolder": str(root), "on_bad_image": policy})
    if policy == "error":
        assert code == 1 and "broken.jpg: cannot read image" in out
        return
    assert code == 0, out
    assert "skipped 1 unreadable image(s)" in out
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert [Path(p).name for p in meta["skipped_images"]] == ["broken.jpg"]


def test_images_are_listed_in_path_order_without_hidden_ones_or_linked_folders(tmp_path):
    # The order decides the split: a folder sorts where its name does, so `b/` comes before
    # `b-1.png` ('-' < '/' as strings, but the folder's name `b` is shorter); hidden names
    # anywhere below the root, non-images and links to folders are left out.
    from tlcli.data.sources import visible_images

    root = tmp_path / "cls"
    for rel in ["b/z.png", "b-1.png", "a.png", "A.PNG", "b/a/c.jpg", "ab.jpeg", ".h/x.png", "._y.png",
                "__MACOSX/m.png", "b/.d/e.png", "notes.txt", "a."]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "c").symlink_to(root / "b", target_is_directory=True)
    (root / "d.png").symlink_to(root / "a.png")
    got = [p.relative_to(root).as_posix() for p in visible_images(root)]
    assert got == ["A.PNG", "a.png", "ab.jpeg", "b/a/c.jpg", "b/z.png", "b-1.png", "d.png"]


def test_a_folder_gone_before_it_is_listed_holds_no_images(tmp_path):
    # Removed between the class scan and the listing (another process cleaning up): no images
    # there, as rglob had it, not an OSError traceback.
    from tlcli.data.sources import visible_images

    assert list(visible_images(tmp_path / "gone")) == []
    (tmp_path / "file.png").write_bytes(b"x")
    assert list(visible_images(tmp_path / "file.png")) == []
