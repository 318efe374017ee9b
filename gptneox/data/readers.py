"""Read records from local dataset files: .json, .jsonl, .parquet, .csv (each optionally .gz).

Every record comes with a location (``line 12``, ``record 3``, ``row 7``) so that a bad record can be
reported by file and place. Bad input stops with a ``DataError`` unless the caller skips bad records,
in which case ``BadRecords`` counts them and keeps the first message for the log.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from gptneox.errors import UserError

FORMATS = (".json", ".jsonl", ".parquet", ".csv")


class DataError(UserError, ValueError):
    """Bad dataset input; the message names the file, the record and the field."""


class BadRecords:
    """Raise on a bad record, or count it when the user asked to skip bad records."""

    def __init__(self, path: Path, skip: bool):
        self.path = path
        self.skip = skip
        self.count = 0
        self.first: str | None = None

    def report(self, message: str) -> None:
        error = f"{self.path}: {message}"
        if not self.skip:
            raise DataError(error + " (set skip_bad_records: true to skip bad records)")
        self.count += 1
        self.first = self.first or error


def file_format(path: Path) -> str:
    """The record format of ``path``, from its suffix with any ``.gz`` removed."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    kind = suffixes[0] if suffixes else ""
    if kind not in FORMATS:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(FORMATS)} (optionally .gz)")
    return kind


def read_records(path: Path, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` pairs of a dataset file."""
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    kind = file_format(path)
    if kind == ".parquet":
        yield from _read_parquet(path)
        return
    last = "the start"
    try:
        with _open_text(path) as stream:
            if kind == ".jsonl":
                records = _read_jsonl(stream, bad)
            elif kind == ".json":
                records = _read_json(path, stream)
            else:
                records = _read_csv(stream)
            for last, record in records:
                yield last, record
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as error:
        bad.report(f"unreadable after {last}: {type(error).__name__}: {error}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_jsonl(stream: io.TextIOBase, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            bad.report(f"line {number}: malformed JSON: {error.msg} at column {error.colno}")
            continue
        yield f"line {number}", record


def _read_json(path: Path, stream: io.TextIOBase) -> Iterator[tuple[str, Any]]:
    try:
        data = json.load(stream)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found a {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"record {index}", record


def _read_csv(stream: io.TextIOBase) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(stream)
    for index, row in enumerate(reader):
        yield f"row {index} (ending on line {reader.line_num})", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install 'gptneox[data]')") from None
    try:
        rows = parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise DataError(f"{path}: cannot read parquet file: {error}") from error
    for index, row in enumerate(rows):
        yield f"row {index}", row
