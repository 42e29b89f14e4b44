"""Data from a table (`data: {csv: ...}` / `{jsonl: ...}`): the rows become an image folder's
pairs, every problem in the table is reported at once at its line and column, and the cache
key covers the table's bytes and every image's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import invoke, make_imagefolder, tiny_recipe, write_recipe

SPLIT_CYCLE = ["train", "train", "train", "val", "test"]


@pytest.fixture
def images(tmp_path) -> list[Path]:
    make_imagefolder(tmp_path / "imgs", per_class=12)
    return sorted((tmp_path / "imgs").rglob("*.png"))


def _rows(images: list[Path], base: Path) -> list[dict]:
    return [{"file": str(p.relative_to(base)), "cls": p.parent.name, "part": SPLIT_CYCLE[i % 5]}
            for i, p in enumerate(images)]


def _csv(path: Path, rows: list[dict], columns=("file", "cls", "part")) -> Path:
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _recipe(tmp_path, **data) -> Path:
    recipe = tiny_recipe(tmp_path, data={"path_column": "file", "label_column": "cls", "batch_size": 16, **data})
    recipe["data"].pop("dataset")
    recipe["data"].pop("limit")
    if "split_column" in data:
        recipe["data"].pop("split")
    return write_recipe(tmp_path / "r.yaml", recipe)


def _ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_csv_with_a_split_column_is_read_as_its_rows_say(tmp_path, images):
    from tlcli.config.reading import load_recipe
    from tlcli.data.sources import plan_data

    rows = _rows(images, tmp_path)
    recipe = _recipe(tmp_path, csv=str(_csv(tmp_path / "labels.csv", rows)), split_column="part")
    plan = plan_data(load_recipe(recipe).data)
    assert plan.class_names == ["a", "b", "c"]
    for split in ("train", "val", "test"):
        expected = sorted((str((tmp_path / r["file"]).resolve()), "abc".index(r["cls"])) for r in rows if r["part"] == split)
        assert sorted(plan.splits[split]) == expected
    _ok("featurize", recipe)
    _ok("fit", recipe)
    assert "test accuracy" in _ok("evaluate", recipe)


def test_jsonl_paths_relative_to_root_and_a_split_carved_like_a_folders(tmp_path, images):
    from tlcli.config.reading import load_recipe
    from tlcli.data.sources import plan_data, plan_imagefolder

    table = tmp_path / "elsewhere" / "labels.jsonl"
    table.parent.mkdir()
    rows = _rows(images, tmp_path / "imgs")
    table.write_text("".join(json.dumps({"file": r["file"], "cls": r["cls"]}) + "\n" for r in rows))
    recipe = load_recipe(_recipe(tmp_path, jsonl=str(table), root=str(tmp_path / "imgs")))
    plan = plan_data(recipe.data)
    # Without a split column the rows are split as the same images in a folder would be.
    folder = plan_imagefolder(recipe.data.model_copy(update={"jsonl": None, "imagefolder": str(tmp_path / "imgs")}),
                              tmp_path / "imgs")
    assert plan.splits == folder.splits and plan.class_names == folder.class_names


def test_every_problem_in_the_table_at_once_each_at_its_line(tmp_path, images, cli):
    rows = _rows(images, tmp_path)
    rows[1]["file"] = "imgs/a/missing.png"
    rows[2]["cls"] = ""
    rows[3]["part"] = "trian"
    rows.append({**rows[10], "cls": "a" if rows[10]["cls"] != "a" else "b"})
    rows.append(dict(rows[20]))
    table = _csv(tmp_path / "labels.csv", rows)
    code, out = cli("validate", str(_recipe(tmp_path, csv=str(table), split_column="part")))
    assert code == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, out
    assert f"error: {table}:3: file: {(tmp_path / 'imgs/a/missing.png').resolve()}: no such file" in errors
    assert f"error: {table}:4: cls: empty: every image needs a class" in errors
    assert f"error: {table}:5: part: 'trian' is not a split; did you mean 'train'? (train, val or test)" in errors
    assert any(e.startswith(f"error: {table}:{len(rows)}:") and "labelled" in e and "at line 12" in e for e in errors), out
    assert any(e.startswith(f"error: {table}:{len(rows) + 1}:") and "listed twice" in e for e in errors), out


def test_a_missing_column_is_the_recipes_problem_at_its_key(tmp_path, images, cli):
    table = _csv(tmp_path / "labels.csv", _rows(images, tmp_path))
    code, out = cli("validate", str(_recipe(tmp_path, csv=str(table), label_column="clss")))
    assert code == 1, out
    assert "r.yaml:" in out and "data.label_column: " in out and "has no column 'clss'; did you mean 'cls'?" in out, out


def test_the_cache_key_covers_the_tables_bytes_and_its_images_bytes(tmp_path, images):
    from tlcli.config.reading import load_recipe
    from tlcli.data.sources import plan_data

    rows = _rows(images, tmp_path)
    table = _csv(tmp_path / "labels.csv", rows)
    recipe = load_recipe(_recipe(tmp_path, csv=str(table), split_column="part"))
    first = plan_data(recipe.data).fingerprint()
    _csv(table, rows, columns=("file", "cls", "part", "note"))  # the same rows, other bytes
    second = plan_data(recipe.data).fingerprint()
    images[0].write_bytes(images[1].read_bytes())  # one image's bytes change
    third = plan_data(recipe.data).fingerprint()
    assert len({first, second, third}) == 3


def test_table_keys_need_a_table_and_one_source_only(tmp_path, cli):
    recipe = tiny_recipe(tmp_path, data={"split_column": "part"})
    code, out = cli("validate", str(write_recipe(tmp_path / "a.yaml", recipe)))
    assert code == 1 and "'split_column' describes a table" in out, out
    recipe = tiny_recipe(tmp_path, data={"csv": "labels.csv"})
    code, out = cli("validate", str(write_recipe(tmp_path / "b.yaml", recipe)))
    assert code == 1 and "give exactly one of" in out and "(this gives dataset, csv)" in out, out


def test_a_run_from_a_table_evaluates_from_another_directory(tmp_path, images):
    rows = _rows(images, tmp_path)
    table = _csv(tmp_path / "labels.csv", rows)
    recipe = tiny_recipe(tmp_path, data={"csv": "labels.csv", "path_column": "file", "label_column": "cls",
                                         "split_column": "part", "batch_size": 16})
    for key in ("dataset", "limit", "split"):
        recipe["data"].pop(key)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert table.is_file()
    assert invoke("fit", path, cwd=tmp_path).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    result = invoke("evaluate", tmp_path / "run", cwd=other)
    assert result.exit_code == 0 and "test accuracy" in result.output, result.output


def test_data_split_beside_a_split_column_that_gives_all_three_is_warned_as_ignored(tmp_path, images):
    table = _csv(tmp_path / "labels.csv", _rows(images, tmp_path))
    recipe = _recipe(tmp_path, csv=str(table), split_column="part")
    data = yaml.safe_load(recipe.read_text())
    data["data"]["split"] = {"val": 0.2, "test": 0.2, "seed": 1}
    write_recipe(recipe, data)
    out = _ok("featurize", recipe)
    assert "data.split: ignored: " in out and "part column gives train, val and test" in out, out
