"""Reading raw rows from JSONL, CSV and Parquet files, each row tagged with where it came from.

A row's location is what error messages name: "data.jsonl:17" (the line), "data.csv:5" (the line the record
starts on, header = line 1), "data.parquet:row 3" (1-based row index).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..textfile import read_utf8

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
    # Bytes, decoded line by line: a bad byte is one bad row (FILE:LINE, skippable), not a failed file.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, _not_utf8(where, raw, err)
                continue
            if not line.strip():
                continue
            yield where, _parse_object(line, where)


def require_rows(path: str, rows: list, reasons: list[str]) -> None:
    """Raise the DataError of a file that gave no usable row (saying how many were skipped, and the first why)."""
    if not rows:
        detail = f" ({len(reasons)} bad rows skipped; first: {reasons[0]})" if reasons else ""
        raise DataError(f"{path}: no usable rows{detail}; expected at least one")


def _parse_object(text: str, where: str) -> dict | DataError:
    """One JSON object, or the DataError saying why not (never a RecursionError)."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(
            f"{where}: invalid JSON ({err.msg} at column {err.colno}); expected one JSON object per line"
        )
    except RecursionError:
        return DataError(
            f"{where}: JSON nested too deeply; expected a row of fields (strings, a list of messages)"
        )
    if not isinstance(row, dict):
        return DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _not_utf8(where: str, raw: bytes, err: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); expected UTF-8 text"
    )


def _starts_with(path: Path, char: str) -> bool:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        head = f.read(4096).lstrip()
    return head.startswith(char)


def _json_array(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    text = read_utf8(path, "UTF-8 text", DataError, encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno}); expected a JSON array of objects"
        ) from err
    except RecursionError as err:
        raise DataError(f"{path}: JSON nested too deeply; expected a JSON array of flat objects") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(records).__name__}")
    for i, row in enumerate(records, 1):
        where = f"{path}:row {i}"
        if not isinstance(row, dict):
            yield where, DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        else:
            yield where, row


# A CSV cell may hold a whole conversation: far more than the csv module's default 131072 characters. The
# limit only guards memory per cell; rows longer than max_len tokens are refused later anyway.
CSV_FIELD_LIMIT = 2**31 - 1


def _csv(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        # surrogateescape: a bad byte becomes one bad record (FILE:LINE, skippable), not a failed file.
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            yield from _csv_records(path, csv.reader(f))
    finally:
        csv.field_size_limit(previous)


def _csv_records(path: Path, reader) -> Iterator[tuple[str, dict | DataError]]:
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise DataError(f"{path}:1: unreadable CSV header ({err})") from err
    if not header or len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(f"{path}:1: expected a header row of distinct column names, got {header}")
    if any(_has_bad_bytes(h) for h in header):
        raise DataError(f"{path}:1: the header is not valid UTF-8; expected UTF-8 text")
    start = reader.line_num + 1
    while True:
        where = f"{path}:{start}"
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            start = reader.line_num + 1
            yield where, DataError(f"{where}: unreadable CSV record ({err})")
            continue
        start = reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue
        yield where, _csv_row(header, record, where)


def _csv_row(header: list[str], record: list[str], where: str) -> dict | DataError:
    if len(record) != len(header):
        return DataError(f"{where}: {len(record)} cells; expected {len(header)} (columns {header})")
    row = {}
    for name, cell in zip(header, record):
        bad = _BAD_BYTE.search(cell)
        if bad:
            byte = ord(bad.group()) - 0xDC00
            return DataError(
                f"{where}: column {name!r} is not valid UTF-8 (byte 0x{byte:02x}); expected UTF-8 text"
            )
        if name == "messages" and cell.lstrip().startswith("["):
            try:
                cell = json.loads(cell)
            except json.JSONDecodeError as err:
                return DataError(
                    f"{where}: column 'messages' is not valid JSON ({err.msg}); expected a JSON list of messages"
                )
            except RecursionError:
                return DataError(f"{where}: column 'messages' is JSON nested too deeply")
        row[name] = cell
    return row


# Bytes that are not UTF-8 become U+DC80..U+DCFF under surrogateescape decoding.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _has_bad_bytes(text: str) -> bool:
    return _BAD_BYTE.search(text) is not None


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
