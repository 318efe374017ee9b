"""Records are decoded one at a time: a bad byte or bad JSON spoils its own record only, named by its line and
column; a JSON array parses the same at any buffer size."""
from __future__ import annotations

import gzip
import json
import random

import pytest

from gptneox.data import DataError
from gptneox.data import readers
from gptneox.data.datasets import read_units
from gptneox.data.readers import BadRecords, read_records


def record(i):
    return json.dumps({"instruction": f"Do {i}", "input": "", "output": f"done {i} ü"}, ensure_ascii=False)


def lines_with(bad_line: bytes, number: int, total: int = 6) -> bytes:
    lines = [record(i).encode() for i in range(1, total + 1)]
    lines[number - 1] = bad_line
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_a_non_utf8_byte_skips_exactly_its_record_and_names_its_line(tmp_path, suffix):
    bad = record(3).encode().replace("ü".encode(), b"\xfc")  # latin-1 u-umlaut in a UTF-8 file
    data = lines_with(bad, 3)
    path = tmp_path / f"code{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(DataError, match=r"code\.json[l.gz]*: line 3: not UTF-8: byte 0xfc at byte 56 of the line"):
        read_units("code_alpaca", path)
    read = read_units("code_alpaca", path, skip=True)
    assert [u[0][0]["text"] for u in read.units] == ["Do 1", "Do 2", "Do 4", "Do 5", "Do 6"]
    assert read.records == 6 and read.drops == {"bad record": 1}


def test_malformed_json_names_the_line_and_the_real_column(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_bytes(lines_with('{"instruction": "Dö", "input": "" "output": "x"}'.encode(), 5))
    with pytest.raises(DataError, match=r"code.jsonl: line 5: malformed JSON at column 35: Expecting ','"):
        read_units("code_alpaca", path)
    assert len(read_units("code_alpaca", path, skip=True).units) == 5


def test_crlf_lines_blank_lines_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + record(1).encode() + b"\r\n\r\n" + record(2).encode() + b"\r\n")
    assert [where for where, _ in read_records(path, BadRecords(skip=False))] == ["line 1", "line 3"]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_a_json_array_parses_the_same_at_any_buffer_size(tmp_path, monkeypatch, chunk):
    rng = random.Random(chunk)
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "x" * rng.randrange(0, 300) + "é\n"}],
                "n": [i, 1.5, None, True]} for i in range(40)]
    path = tmp_path / "share.json"
    path.write_text(json.dumps(records, indent=rng.choice([None, 2]), ensure_ascii=False))
    monkeypatch.setattr(readers, "CHUNK_CHARS", chunk)
    got = list(read_records(path, BadRecords(skip=False)))
    assert [r for _, r in got] == records
    lines = path.read_text().splitlines()
    for where, rec in got:  # each location names the line the element starts on: "{" there, its id next
        line = int(where.split("line ")[1].rstrip(")"))
        assert lines[line - 1].lstrip("[ ").startswith("{") and f'"id": "{rec["id"]}"' in "".join(lines[line - 1:line + 1])


def test_a_truncated_json_array_names_the_line(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_CHARS", 16)
    path = tmp_path / "share.json"
    path.write_text(json.dumps([{"a": i} for i in range(5)], indent=1)[:-20])
    with pytest.raises(DataError, match=r"share.json: malformed JSON at line 1[0-9], column \d+"):
        list(read_records(path, BadRecords(skip=False)))
