"""Reading raw rows from JSONL, CSV and Parquet files, each row tagged with where it came from.

A row's location is what error messages name: "data.jsonl:17" (the line), "data.csv:5" (the line the record
starts on, header = line 1), "data.parquet:row 3" (1-based row index).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A data file or row is unusable; the message starts with "FILE:LINE:" and says what was expected."""


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict | DataError]]:
    """Yield (location, row) for every record of `path`; an unparseable record yields a DataError instead.

    JSONL: one JSON object per line (blank lines are ignored); a .json file may instead hold one JSON array
    of objects (rows are then named "FILE:row N"). CSV: a header row, then one record per row; a
    cell holding JSON (a `messages` list) is decoded. Parquet: one record per row (needs pyarrow).

    Raises:
        FileNotFoundError: `path` does not exist.
        DataError: an unknown suffix, or a file that cannot be read at all (bad CSV header, bad Parquet).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix == ".json" and _starts_with(path, "["):
        yield from _json_array(path)
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl(path)
    elif suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise DataError(f"{path}: unknown data file type {suffix!r}; expected one of {SUFFIXES}")


def _jsonl(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    where,
                    DataError(
                        f"{where}: invalid JSON ({err.msg} at column {err.colno}); expected one JSON object per line"
                    ),
                )
                continue
            if not isinstance(row, dict):
                yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                continue
            yield where, row


def _starts_with(path: Path, char: str) -> bool:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return head.startswith(char)


def _json_array(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); expected a JSON array of objects"
        ) from err
    for i, row in enumerate(records, 1):
        where = f"{path}:row {i}"
        if not isinstance(row, dict):
            yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        else:
            yield where, row


def _csv(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        if not header or len(set(header)) != len(header) or not all(h.strip() for h in header):
            raise DataError(f"{path}:1: expected a header row of distinct column names, got {header}")
        start = reader.line_num + 1
        for record in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                yield (
                    where,
                    DataError(f"{where}: {len(record)} cells; expected {len(header)} (columns {header})"),
                )
                continue
            row = {}
            for name, cell in zip(header, record):
                if name == "messages" and cell.lstrip().startswith("["):
                    try:
                        cell = json.loads(cell)
                    except json.JSONDecodeError as err:
                        row = DataError(
                            f"{where}: column 'messages' is not valid JSON ({err.msg}); expected a JSON list of messages"
                        )
                        break
                row[name] = cell
            yield where, row


def _parquet(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("reading Parquet needs pyarrow: pip install 'lorakit[train]'") from err
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    for i, row in enumerate(records, 1):
        yield f"{path}:row {i}", row
