"""Data from a table: a CSV or JSON Lines file of image paths, labels and (optionally) splits.

fastai's `ImageDataLoaders.from_csv`, Ludwig's CSV input: one row per image. Paths are
relative to the table's folder (or `data.root`). Every problem is found in one pass and
reported together, each at the table's line and column: a missing file, an empty label, an
unknown split, a path listed twice. The rows are then what an image folder gives (absolute
paths and labels), so the splits, the cache key (the table's bytes and every image's bytes)
and the pipeline are the image folder's.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tlcli.config.schema import DataSpec
from tlcli.errors import DataError, SpecError, did_you_mean

SPLITS = ("train", "val", "test")
MAX_TABLE_BYTES = 1 << 30  # a table of a billion bytes holds some ten million rows
MAX_CELL = 4096  # a path or a class name longer than this is not one
MAX_PROBLEMS = 20  # reported in full; the rest are counted


@dataclass
class Row:
    line: int  # the table's line (1 is a CSV's header)
    path: Path
    label: str
    split: Optional[str]


def table_of(spec: DataSpec) -> tuple[Path, tuple]:
    """The table's file and the recipe key that names it."""
    return (Path(spec.csv), ("data", "csv")) if spec.csv else (Path(spec.jsonl), ("data", "jsonl"))


def read_table(spec: DataSpec) -> list[Row]:
    """The table's rows, checked. A table that cannot be read at all is the recipe's problem
    (at data.csv); problems in its rows are the table's, each at its line."""
    table, loc = table_of(spec)
    if not table.is_file():
        raise SpecError([(loc, f"{table}: no such file")])
    if table.stat().st_size > MAX_TABLE_BYTES:
        raise SpecError([(loc, f"{table}: larger than {MAX_TABLE_BYTES >> 20} MiB; is it the table of images?")])
    root = Path(spec.root) if spec.root else table.parent
    if not root.is_dir():
        raise SpecError([(("data", "root"), f"{root} is not a directory")])
    columns = {"path": spec.path_column, "label": spec.label_column, "split": spec.split_column}
    records = _csv_records(table, loc, columns) if spec.csv else _jsonl_records(table, columns)
    problems: list[str] = []
    rows = [row for row in (_row(table, line, record, columns, root, problems) for line, record in records) if row]
    _duplicates(table, rows, problems)
    if not rows and not problems:
        problems.append(f"{table}: no rows")
    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise DataError("\n".join(problems[:MAX_PROBLEMS] + ([f"{table}: and {more} more problems"] if more > 0 else [])))
    return rows


def _csv_records(table: Path, loc: tuple, columns: dict) -> list[tuple[int, dict]]:
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [(key, name) for key, name in columns.items() if name is not None and name not in header]
            if missing:
                raise SpecError([(("data", f"{key}_column"), f"{table} has no column '{name}'{did_you_mean(name, header)} "
                                                           f"(its columns: {', '.join(header) or 'none'})")
                                 for key, name in missing])
            records = []
            for record in reader:
                records.append((reader.line_num, record))
            return records
    except UnicodeDecodeError as err:
        raise SpecError([(loc, f"{table}: not UTF-8 text ({err.reason} at byte {err.start})")]) from None
    except csv.Error as err:
        raise SpecError([(loc, f"{table}: not a CSV table ({err})")]) from None


def _jsonl_records(table: Path, columns: dict) -> list[tuple[int, dict]]:
    records, problems = [], []
    with open(table, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                problems.append(f"{table}:{line_number}: not a JSON object ({str(err).split(':')[0]})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{table}:{line_number}: not a JSON object (a {type(record).__name__})")
                continue
            for key, name in columns.items():
                if name is not None and name not in record:
                    problems.append(f"{table}:{line_number}: no '{name}' ({key}_column){did_you_mean(name, list(record))}")
            records.append((line_number, record))
    if problems:
        raise DataError("\n".join(problems[:MAX_PROBLEMS]))
    return records


def _row(table: Path, line: int, record: dict, columns: dict, root: Path, problems: list[str]) -> Optional[Row]:
    def cell(key: str) -> str:
        value = record.get(columns[key])
        return "" if value is None else str(value).strip()

    found = len(problems)
    path, label = cell("path"), cell("label")
    where = f"{table}:{line}"
    if not path:
        problems.append(f"{where}: {columns['path']}: empty: every row names an image")
    elif len(path) > MAX_CELL:
        problems.append(f"{where}: {columns['path']}: longer than {MAX_CELL} characters")
    if not label:
        problems.append(f"{where}: {columns['label']}: empty: every image needs a class")
    elif len(label) > MAX_CELL:
        problems.append(f"{where}: {columns['label']}: longer than {MAX_CELL} characters")
    split = None
    if columns["split"] is not None:
        split = cell("split")
        if split not in SPLITS:
            problems.append(f"{where}: {columns['split']}: '{split}' is not a split{did_you_mean(split, SPLITS)} "
                            f"(train, val or test)")
    if len(problems) > found:
        return None
    full = (root / Path(path).expanduser()).resolve()
    if not full.is_file():
        problems.append(f"{where}: {columns['path']}: {full}: no such file")
        return None
    return Row(line, full, label, split)


def _duplicates(table: Path, rows: list[Row], problems: list[str]) -> None:
    first: dict[Path, Row] = {}
    for row in rows:
        seen = first.setdefault(row.path, row)
        if seen is row:
            continue
        if seen.label != row.label:
            problems.append(f"{table}:{row.line}: {row.path} is labelled '{row.label}' here and '{seen.label}' at "
                            f"line {seen.line}: one image, one class")
        else:
            problems.append(f"{table}:{row.line}: {row.path} is also at line {seen.line}: an image listed twice "
                            "would count twice")
