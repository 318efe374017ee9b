"""Read records from local dataset files: JSON arrays, JSON Lines, parquet, csv and Arrow (each optionally .gz).

Every record comes with a location (``line 12``, ``record 3 (line 40)``, ``row 7``) so that a bad record
can be reported by file and place; lines and the records of a JSON array count from 1, as a user counts.
Bad input stops with a ``DataError`` unless the caller skips bad records, in which case ``BadRecords``
counts them and keeps the first message for the log.

Files are streamed: a JSON Lines file is read line by line as bytes and each line is decoded on its own
(a bad byte spoils that record only), a JSON array is parsed one element at a time from a bounded
buffer, and parquet and Arrow are read in record batches. So reading holds one record at a time, not the
file. ``.arrow`` is the Arrow IPC stream format that ``datasets`` writes (``save_to_disk`` shards, its cache).
Whether a ``.json`` file is a JSON array or JSON Lines (what pandas and ``datasets`` write under that
name) is decided from its first character.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import sys
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from gptneox.errors import UserError
from gptneox.extras import install_hint, installed

FORMATS = (".json", ".jsonl", ".parquet", ".csv", ".arrow")
CHUNK_CHARS = 1 << 20  # a JSON array is parsed from a buffer of about this many characters
PARQUET_BATCH_ROWS = 1024
BOM = "\ufeff"
# csv's default field limit (131,072 characters) would make a file unreadable from its first long field on.
# The csv module has only a process-wide limit: it is raised while our reader reads a row, then restored.
CSV_FIELD_LIMIT = 2**31 - 1  # the largest that a C long holds on every platform


class DataError(UserError, ValueError):
    """Bad dataset input; the message names the file, the record and the field."""


class RecordError(UserError, ValueError):
    """A record that does not match its dataset's schema; the reader adds the file and the location."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")


class BadRecords:
    """Raise on a bad record, or count it when the user asked to skip bad records; the same for the rest of
    a file that cannot be read (a truncated .gz, a bad byte in a csv), counted apart: it may hold any number
    of records."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.count = 0
        self.first: str | None = None
        self.unread_rests: list[str] = []

    def report(self, path: Path, message: str) -> None:
        error = f"{path}: {message}"
        if not self.skip:
            raise DataError(error + " (set skip_bad_records: true to skip bad records)")
        self.count += 1
        self.first = self.first or error

    def report_unread_rest(self, path: Path, line: int, error: Exception) -> None:
        message = f"{path}: the rest of the file from line {line} could not be read ({type(error).__name__}: {error})"
        if not self.skip:
            raise DataError(message + " (set skip_bad_records: true to keep the records before it)")
        self.unread_rests.append(message)


class _Position:
    """The first line of a file that is not yet read whole: where its rest begins if it cannot be read."""

    next_line = 1


def record_format(path: Path) -> str | None:
    """The record format of ``path`` from its suffix with any ``.gz`` removed; None for other files."""
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    kind = suffixes[0] if suffixes else ""
    return kind if kind in FORMATS else None


def file_format(path: Path) -> str:
    kind = record_format(path)
    if kind is None:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(FORMATS)} (optionally .gz)")
    return kind


def read_records(path: Path, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` pairs of a dataset file."""
    if not path.is_file():
        raise DataError(f"dataset file not found: {path}")
    kind = file_format(path)
    if kind in (".parquet", ".arrow"):
        yield from _read_arrow_batches(path, kind)
        return
    position = _Position()
    try:
        with _open_binary(path) as stream:
            if kind == ".csv":  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
                records = _read_csv(io.TextIOWrapper(stream, encoding="utf-8-sig", newline=""), position)
            elif kind == ".json" and _first_char(stream) == "[":
                records = _read_json_array(path, stream, bad, position)
            else:
                hint = " (read as JSON Lines: the file does not start with '[')" if kind == ".json" else ""
                records = _read_json_lines(path, stream, bad, hint, position)
            yield from records
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csv.Error) as error:
        bad.report_unread_rest(path, position.next_line, error)


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _first_char(stream: BinaryIO) -> str:
    """The first character that is not whitespace or a byte-order mark; the stream is rewound."""
    head = stream.read(4096)
    stream.seek(0)
    return head.decode("utf-8", errors="replace").lstrip(BOM + " \t\r\n")[:1]


def _read_json_lines(path: Path, stream: BinaryIO, bad: BadRecords, hint: str, position: _Position
                     ) -> Iterator[tuple[str, Any]]:
    for number, raw in enumerate(stream, start=1):
        position.next_line = number + 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            bad.report(path, f"line {number}: not UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1} "
                             f"of the line ({error.reason})")
            continue
        line = line.rstrip("\r\n")  # so that the column of an error at the end of the line is on the line
        if number == 1:
            line = line.lstrip(BOM)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            bad.report(path, f"line {number}: malformed JSON at column {error.colno}: {error.msg}{hint}")
            continue
        except RecursionError:
            bad.report(path, f"line {number}: JSON nested too deeply to read")
            continue
        except ValueError as error:  # valid JSON that Python will not read: an integer of too many digits
            bad.report(path, f"line {number}: {_unreadable_json(error)}")
            continue
        yield f"line {number}", record


def _unreadable_json(error: ValueError) -> str:
    """Why json could not read valid JSON (json raises ValueError for an integer longer than Python's limit)."""
    if "integer string conversion" in str(error):
        return (f"a JSON integer longer than {sys.get_int_max_str_digits()} digits, the most Python reads "
                f"(the environment variable PYTHONINTMAXSTRDIGITS raises the limit)")
    return f"JSON that cannot be read ({error})"


def _read_json_array(path: Path, stream: BinaryIO, bad: BadRecords, position: _Position
                     ) -> Iterator[tuple[str, Any]]:
    """The elements of a top-level JSON array, parsed one at a time from a bounded text buffer. Records are
    numbered from 1. An element that is valid JSON but that Python will not read (an integer of too many
    digits) is a bad record: it is parsed again with integers kept as text to find where it ends."""
    decoder = json.JSONDecoder()
    integers_as_text = json.JSONDecoder(parse_int=str)
    text = codecs.getincrementaldecoder("utf-8")()
    buffer, pos, eof, read_bytes = "", 0, False, 0
    line, dropped_columns = 1, 0  # the line of buffer[pos]; characters of buffer[0]'s line already dropped
    want = CHUNK_CHARS

    def refill() -> None:
        nonlocal buffer, pos, eof, read_bytes, dropped_columns
        chunk = stream.read(want)
        read_bytes += len(chunk)
        newline = buffer.rfind("\n", 0, pos)
        dropped_columns = pos - newline - 1 if newline >= 0 else dropped_columns + pos
        try:
            buffer = buffer[pos:] + text.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 near byte {read_bytes - len(chunk) + error.start + 1} "
                            f"(line {line} or later): {error.reason}") from None
        pos, eof = 0, not chunk

    def skip_space() -> None:
        nonlocal pos, line
        while True:
            end = pos
            while end < len(buffer) and buffer[end] in " \t\r\n" + BOM:
                end += 1
            line += buffer.count("\n", pos, end)
            pos = end
            position.next_line = line
            if pos < len(buffer) or eof:
                return
            refill()

    def malformed(message: str, at: int) -> DataError:
        row = line + buffer.count("\n", pos, at)
        newline = buffer.rfind("\n", 0, at)
        column = at - newline if newline >= 0 else dropped_columns + at + 1
        return DataError(f"{path}: malformed JSON at line {row}, column {column}: {message}")

    def close() -> None:
        nonlocal pos
        pos += 1
        skip_space()
        if pos < len(buffer):
            raise malformed("extra data after the array", pos)

    refill()
    skip_space()
    pos += 1  # the "[" that decided the format
    skip_space()
    if buffer[pos:pos + 1] == "]":
        close()
        return
    index = 1
    while True:
        if pos == len(buffer):
            raise malformed("the array is not closed", pos)
        unreadable: ValueError | None = None
        while True:  # a value that reaches the end of the buffer may go on in the next chunk
            try:
                record, end = (integers_as_text if unreadable else decoder).raw_decode(buffer, pos)
                if end < len(buffer) or eof:
                    break
            except json.JSONDecodeError as error:
                if eof:
                    raise malformed(error.msg, error.pos) from None
            except RecursionError:
                raise malformed(f"record {index} is nested too deeply to read", pos) from None
            except ValueError as error:  # valid JSON so far; parse the element again to find its end
                unreadable = error
                continue
            want *= 2  # an element longer than the buffer: read more at once, so retries stay rare
            refill()
        want = CHUNK_CHARS
        if unreadable:
            bad.report(path, f"record {index} (line {line}): {_unreadable_json(unreadable)}")
        else:
            yield f"record {index} (line {line})", record
        line += buffer.count("\n", pos, end)
        pos = end
        index += 1
        skip_space()
        if pos == len(buffer):
            raise malformed("the array is not closed", pos)
        if buffer[pos] == "]":
            close()
            return
        if buffer[pos] != ",":
            raise malformed("expected ',' or ']' after an element", pos)
        pos += 1
        skip_space()


def _read_csv(stream: io.TextIOBase, position: _Position) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(stream)
    index = 0
    while True:
        limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # not left raised for other code between rows
        try:
            row = next(reader)
        except StopIteration:
            return
        finally:
            csv.field_size_limit(limit)
        position.next_line = reader.line_num + 1
        yield f"row {index} (ending on line {reader.line_num})", row
        index += 1


def _read_arrow_batches(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    """Rows of a parquet file or an Arrow IPC stream, one record batch in memory at a time."""
    name = kind.lstrip(".")
    if not installed("pyarrow.parquet"):
        raise DataError(f"{path}: reading .{name} files needs pyarrow, which is not installed: "
                        f"{install_hint('pyarrow')}")
    import pyarrow as pa
    import pyarrow.parquet as parquet
    index = 0
    compressed = path.suffix == ".gz"  # a plain file is given by path, so that pyarrow reads it natively
    try:
        with _open_binary(path) if compressed else contextlib.nullcontext(path) as source:
            if kind == ".parquet":
                batches = parquet.ParquetFile(source).iter_batches(batch_size=PARQUET_BATCH_ROWS)
            else:
                batches = pa.ipc.open_stream(source if compressed else pa.OSFile(str(source)))  # read, not mapped
            for batch in batches:
                for row in batch.to_pylist():
                    yield f"row {index}", row
                    index += 1
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        hint = " (expected the Arrow IPC stream format that datasets writes)" if kind == ".arrow" and not index else ""
        raise DataError(f"{path}: cannot read {name} file after row {index}: {error}{hint}") from error
