"""Readers and dataset sources: the bundled sample in every format, conversion rules, and bad input."""
from __future__ import annotations

import csv
import gzip
import json
import logging
import sys
from pathlib import Path

import pytest

from collections import Counter

from gptneox.data.datasets import read_units as read
from gptneox.data.readers import BadRecords, DataError, read_records
from gptneox.data.sources import BAD_RECORD, UNREAD_REST, code_alpaca, dolly15k, oasst_export, vicuna

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def read_units(*args, **kwargs):
    return read(*args, **kwargs).units


def run(convert, record, **options):
    """A converter on one record; the drop counts are tested elsewhere."""
    return convert(record, Counter(), **options)


def flat(units):
    return [conversation for unit in units for conversation in unit]


def texts(conversation):
    return [(m["role"], m["text"]) for m in conversation]


# --- the bundled sample, one file per format ---------------------------------------------------------


def test_sample_csv_gsm_rows_become_pairs():
    with open(SAMPLE / "gsm_sample.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    conversations = flat(read_units("grade_school_math_instructions", SAMPLE / "gsm_sample.csv"))
    assert [texts(c) for c in conversations] == [
        [("prompter", r["INSTRUCTION"]), ("assistant", r["RESPONSE"])] for r in rows]


def test_sample_parquet_dolly_puts_cleaned_context_before_instruction():
    conversations = flat(read_units("dolly15k", SAMPLE / "dolly_sample.parquet"))
    assert len(conversations) > 40
    first = conversations[0][0]["text"]
    assert first.startswith("The Selfish Gene is a 1976 book by Richard Dawkins. In it")
    assert first.endswith("What did Richard Dawkins coin in The Selfish Gene?")
    assert not any("[" in c[0]["text"] for c in conversations)  # [1], [a], [citation needed] removed


def test_sample_json_vicuna_merges_unescapes_and_drops_trailing_question():
    records = json.loads((SAMPLE / "vicuna_sample.json").read_text())
    conversations = flat(read_units("vicuna", SAMPLE / "vicuna_sample.json"))
    assert len(conversations) == len(records)
    assert all(c[-1]["role"] == "assistant" for c in conversations)
    assert not any("\\*" in m["text"] for c in conversations for m in c)
    merged = conversations[0][-1]["text"]
    assert "\n" in merged and "*a picture of a cat" in merged


def test_sample_jsonl_code_alpaca_joins_input_and_filters_openai():
    records = [json.loads(line) for line in (SAMPLE / "code_alpaca_sample.jsonl").read_text().splitlines()]
    conversations = flat(read_units("code_alpaca", SAMPLE / "code_alpaca_sample.jsonl"))
    assert len(conversations) == len(records) - 1  # the OpenAI record
    assert not any("openai" in m["text"].lower() for c in conversations for m in c)
    with_input = next(r for r in records if r["input"])
    assert any(c[0]["text"] == with_input["instruction"] + "\n" + with_input["input"] for c in conversations)


def test_sample_jsonl_gz_oasst_threads_follow_the_filters():
    units = read_units("oasst_export", SAMPLE / "oasst_sample.jsonl.gz", converter_options={"lang": "en,de,es,fr"})
    threads = flat(units)
    all_text = " ".join(m["text"] for t in threads for m in t)
    assert "removed by a moderator" not in all_text  # deleted message
    assert "[synthetic]" not in all_text  # synthetic message
    assert "Is this tree reviewed?" not in all_text and "Is this tree finished?" not in all_text
    assert "ミーム" not in all_text  # ja is not among the languages
    assert "Ein Meme ist" in all_text and "Un meme es" in all_text
    assert all(t[0]["role"] == "prompter" and t[-1]["role"] == "assistant" for t in threads)
    assert any(len(t) >= 4 for t in threads)  # multi-turn threads
    card = "What is a meme, and what's the history behind this word?"
    assert sum(t[0]["text"] == card for t in threads) >= 4  # one tree per answer template
    english_only = flat(read_units("oasst_export", SAMPLE / "oasst_sample.jsonl.gz", converter_options={"lang": "en"}))
    assert len(english_only) < len(threads)


# --- oasst thread extraction on hand-made trees --------------------------------------------------------


def node(role, text, rank=None, replies=(), **fields):
    return {"role": role, "text": text, "rank": rank, "replies": list(replies), **fields}


def export(root, state="ready_for_export"):
    root.setdefault("lang", "en")
    root.setdefault("review_result", True)
    return {"message_tree_id": "t", "tree_state": state, "prompt": root}


def test_oasst_threads_ranks_and_first_prompter_leaf():
    tree = export(node("prompter", "Q", replies=[
        node("assistant", "A0", rank=0, replies=[node("prompter", "follow", replies=[node("assistant", "B")]),
                                                  node("prompter", "second leaf")]),
        node("assistant", "A1", rank=1, replies=[node("prompter", "first leaf"), node("prompter", "other leaf")]),
        node("assistant", "A2", rank=2),
    ]))
    threads = [[m["text"] for m in t] for t in run(oasst_export, tree)]
    assert threads == [["Q", "A0", "follow", "B"], ["Q", "A1"], ["Q", "A2"]]
    top2 = [[m["text"] for m in t] for t in run(oasst_export, tree, top_k=2)]
    assert top2 == [["Q", "A0", "follow", "B"], ["Q", "A1"]]


def test_oasst_top_k_drops_unranked_siblings_but_keeps_an_only_child():
    tree = export(node("prompter", "Q", replies=[node("assistant", "A"), node("assistant", "B")]))
    drops = Counter()
    assert oasst_export(tree, drops, top_k=1) == []
    assert drops == {"thread with an assistant ranked >= top_k or unranked": 2}  # each thread once, by its reason
    unanswered = Counter()
    assert oasst_export(export(node("prompter", "Q")), unanswered) == []
    assert unanswered == {"no assistant reply": 1}
    only = export(node("prompter", "Q", replies=[node("assistant", "A")]))
    assert len(run(oasst_export, only, top_k=1)) == 1


def test_oasst_tree_filters():
    answer = [node("assistant", "A")]
    assert run(oasst_export, export(node("prompter", "Q", replies=answer), state="growing")) == []
    assert run(oasst_export, export(node("prompter", "Q", replies=answer, review_result=False))) == []
    assert run(oasst_export, export(node("prompter", "Q", replies=answer, lang="de")), lang="en") == []
    assert len(run(oasst_export, export(node("prompter", "Q", replies=answer, lang="de")), lang=["en", "de"])) == 1
    deleted = export(node("prompter", "Q", replies=[node("assistant", "A", deleted=True), node("assistant", "B")]))
    assert [[m["text"] for m in t] for t in run(oasst_export, deleted)] == [["Q", "B"]]


# --- conversion rules -------------------------------------------------------------------------------------


def test_vicuna_rules():
    record = {"conversations": [
        {"from": "human", "value": "a\\_b"}, {"from": "human", "value": "c"},
        {"from": "gpt", "value": "x" * 3000}, {"from": "human", "value": "left over"}]}
    (conversation,) = run(vicuna, record)
    assert texts(conversation) == [("prompter", "a_b\nc"), ("assistant", "x" * 2048)]
    assert run(vicuna, {"conversations": [{"from": "gpt", "value": "hi"}]}) == []
    assert run(vicuna, {"conversations": []}) == []


def test_dolly_both_schemas():
    oa = {"INSTRUCTION": "Who?", "RESPONSE": "Him.", "METADATA": {"CONTEXT": "He did it.[12][citation needed][b]"}}
    original = {"instruction": "Who?", "context": "He did it.[3, 4]", "response": "Him.", "category": "qa"}
    flat_csv = {"INSTRUCTION": "Who?", "RESPONSE": "Him.", "METADATA.CONTEXT": "He did it."}
    json_string = {"INSTRUCTION": "Who?", "RESPONSE": "Him.", "METADATA": json.dumps({"CONTEXT": "He did it."})}
    expected = [[{"role": "prompter", "text": "He did it. Who?"}, {"role": "assistant", "text": "Him."}]]
    for record in (oa, original, flat_csv, json_string):
        assert run(dolly15k, record) == expected
    no_context = {"instruction": "Who?", "context": "", "response": "Him."}
    assert run(dolly15k, no_context)[0][0]["text"] == "Who?"


def test_code_alpaca_rules():
    assert run(code_alpaca, {"instruction": "Do", "input": "x = 1", "output": "y"})[0][0]["text"] == "Do\nx = 1"
    assert run(code_alpaca, {"instruction": "Do", "input": "", "output": "y"})[0][0]["text"] == "Do"
    assert run(code_alpaca, {"instruction": "Use OpenAI", "input": "", "output": "y"}) == []


# --- bad input ------------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"instruction": "Do", "input": "", "output": "ok"})


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "line 2: malformed JSON"),
    (json.dumps({"instruction": "Do", "input": ""}), "line 2: field 'output': missing"),
    (json.dumps({"instruction": 3, "input": "", "output": "x"}), "line 2: field 'instruction': expected str, got int"),
    (json.dumps(["a list"]), "line 2: field 'instruction': cannot be read"),
])
def test_bad_jsonl_record_names_file_line_and_field(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "code.jsonl", [GOOD, bad_line, GOOD])
    with pytest.raises(DataError, match=message) as error:
        read_units("code_alpaca", path)
    assert str(path) in str(error.value)


def test_skip_bad_records_counts_and_logs(tmp_path, caplog):
    path = write_lines(tmp_path / "code.jsonl", [GOOD, "{oops", json.dumps({"instruction": "x"}), GOOD])
    with caplog.at_level(logging.WARNING):
        units = read_units("code_alpaca", path, skip=True)
    assert len(units) == 2
    assert "skipped 2 bad record(s)" in caplog.text and str(path) in caplog.text


def test_unknown_oasst_roles_are_errors(tmp_path):
    tree = export(node("prompter", "Q", replies=[node("user", "A")]))
    oasst = write_lines(tmp_path / "trees.jsonl", [json.dumps(tree)])
    with pytest.raises(DataError, match=r"line 1: field 'prompt.replies\[0\].role': unknown role 'user'"):
        read_units("oasst_export", oasst)
    swapped = export(node("prompter", "Q", replies=[node("prompter", "again")]))
    with pytest.raises(DataError, match=r"prompt.replies\[0\].role"):
        read_units("oasst_export", write_lines(tmp_path / "swapped.jsonl", [json.dumps(swapped)]))


def test_broken_gzip_says_the_rest_of_the_file_from_a_line_is_lost_and_counts_it(tmp_path, caplog):
    lines = "".join(GOOD + "\n" for _ in range(400)).encode()
    data = gzip.compress(lines)
    path = tmp_path / "code.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"code.jsonl.gz: the rest of the file from line \d+ could not be read "
                                        r"\(EOFError: .*\(set skip_bad_records: true to keep the records before it\)$"):
        read_units("code_alpaca", path)
    with caplog.at_level(logging.WARNING):
        result = read("code_alpaca", path, skip=True)
    kept = len(result.units)
    assert 0 < kept < 400 and result.records == kept  # every record before the break, no made-up count
    assert f"the rest of the file from line {kept + 1} could not be read (EOFError" in caplog.text
    assert "the records before it are kept" in caplog.text and "bad record" not in caplog.text
    assert result.drops == {UNREAD_REST: 1}
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="code.jsonl.gz"):
        read_units("code_alpaca", path)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_units("code_alpaca", tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_units("code_alpaca", tmp_path / "data.txt")
    (tmp_path / "object.json").write_text('{\n  "instruction": "Do"\n}\n')  # one pretty-printed object
    with pytest.raises(DataError, match=r"object.json: line 1: malformed JSON at column 2: .*read as JSON Lines"):
        read_units("code_alpaca", tmp_path / "object.json")
    (tmp_path / "broken.json").write_text('[' + GOOD + ',')
    with pytest.raises(DataError, match="broken.json: malformed JSON at line 1, column 53: the array is not closed"):
        read_units("code_alpaca", tmp_path / "broken.json")
    (tmp_path / "broken.json").write_text('[\n  ' + GOOD + ',\n  {"instruction": "Do",, "output": "x"}\n]')
    with pytest.raises(DataError, match="broken.json: malformed JSON at line 3, column 24: Expecting property name"):
        read_units("code_alpaca", tmp_path / "broken.json")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match="broken.parquet: cannot read parquet"):
        read_units("dolly15k", tmp_path / "broken.parquet")


def test_gzipped_parquet_reads_like_the_plain_file(tmp_path):
    path = tmp_path / "dolly.parquet.gz"
    path.write_bytes(gzip.compress((SAMPLE / "dolly_sample.parquet").read_bytes()))
    plain = list(read_records(SAMPLE / "dolly_sample.parquet", BadRecords(skip=False)))
    assert len(plain) > 40 and list(read_records(path, BadRecords(skip=False))) == plain


def test_csv_missing_column_names_row(tmp_path):
    path = tmp_path / "gsm.csv"
    path.write_text("INSTRUCTION,ANSWER\nq,a\n")
    with pytest.raises(DataError, match=r"gsm.csv: row 0 \(ending on line 2\): field 'RESPONSE': missing"):
        read_units("grade_school_math_instructions", path)


def test_parquet_without_pyarrow_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="needs pyarrow"):
        list(read_records(SAMPLE / "dolly_sample.parquet", BadRecords(skip=False)))


def test_a_deeply_nested_json_line_is_one_bad_record(tmp_path, caplog):
    deep = '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "x"}'
    path = write_lines(tmp_path / "code.jsonl", [GOOD, deep, GOOD])
    with pytest.raises(DataError, match=r"code.jsonl: line 2: JSON nested too deeply to read \(set skip_bad_records"):
        read_units("code_alpaca", path)
    with caplog.at_level(logging.WARNING):
        result = read("code_alpaca", path, skip=True)
    assert len(result.units) == 2 and result.records == 3 and result.drops == {BAD_RECORD: 1}
    assert "skipped 1 bad record(s); first: " + f"{path}: line 2: JSON nested too deeply" in caplog.text
    array = tmp_path / "code.json"
    array.write_text(f"[{GOOD},\n{deep}]")
    with pytest.raises(DataError,
                       match=r"code.json: malformed JSON at line 2, column 1: record 2 is nested too deeply"):
        read_units("code_alpaca", array, skip=True)


def test_a_thread_too_deep_to_follow_is_one_bad_record(tmp_path):
    """oasst hub rows: a chain of replies deeper than Python's recursion is one bad tree, not a traceback."""
    rows = [{"message_id": f"m{i}", "parent_id": f"m{i - 1}" if i else None, "message_tree_id": "t",
             "role": "prompter" if i % 2 == 0 else "assistant", "text": f"turn {i}", "lang": "en",
             "review_result": True, "deleted": False, "synthetic": False, "rank": 0, "tree_state": "ready_for_export"}
            for i in range(sys.getrecursionlimit() + 100)]
    path = write_lines(tmp_path / "rows.messages.jsonl", [json.dumps(row) for row in rows])
    with pytest.raises(DataError, match=r"rows.messages.jsonl: .*nested too deeply to read"):
        read_units("oasst_export", path)
    assert read("oasst_export", path, skip=True).drops == {BAD_RECORD: 1}


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path, suffix):
    """Excel's "CSV UTF-8" writes a UTF-8 byte-order mark before the header."""
    text = "INSTRUCTION,RESPONSE\r\nWhat is 2+2?,4\r\n\"Say \"\"hi\"\"\",hi\r\n"
    data = ("\ufeff" + text).encode("utf-8")
    path = tmp_path / f"gsm{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    conversations = flat(read_units("grade_school_math_instructions", path))
    assert [texts(c) for c in conversations] == [[("prompter", "What is 2+2?"), ("assistant", "4")],
                                                 [("prompter", 'Say "hi"'), ("assistant", "hi")]]


def test_an_integer_longer_than_python_reads_is_one_bad_record_in_json_lines_and_arrays(tmp_path, caplog):
    """json raises a bare ValueError for an integer of more than sys.get_int_max_str_digits() digits."""
    huge = '{"instruction": "Do", "input": "", "output": "ok", "id": ' + "9" * 5000 + "}"
    lines = write_lines(tmp_path / "code.jsonl", [GOOD, huge, GOOD])
    limit = sys.get_int_max_str_digits()
    with pytest.raises(DataError, match=rf"code.jsonl: line 2: a JSON integer longer than {limit} digits, the most "
                                        r"Python reads .*\(set skip_bad_records"):
        read_units("code_alpaca", lines)
    with caplog.at_level(logging.WARNING):
        result = read("code_alpaca", lines, skip=True)
    assert len(result.units) == 2 and result.records == 3 and result.drops == {BAD_RECORD: 1}
    assert f"{lines}: line 2: a JSON integer longer than" in caplog.text
    array = tmp_path / "code.json"
    array.write_text(f"[\n{GOOD},\n{huge},\n{GOOD}\n]\n")
    with pytest.raises(DataError, match=r"code.json: record 2 \(line 3\): a JSON integer longer than"):
        read_units("code_alpaca", array)
    result = read("code_alpaca", array, skip=True)
    assert len(result.units) == 2 and result.records == 3 and result.drops == {BAD_RECORD: 1}


def test_an_integer_longer_than_python_reads_across_array_buffers_is_one_bad_record(tmp_path, monkeypatch):
    """The integer reaches past the buffer: the element is read again, with more text, to find its end."""
    monkeypatch.setattr("gptneox.data.readers.CHUNK_CHARS", 64)
    huge = '{"id": ' + "9" * 5000 + ', "instruction": "Do", "input": "", "output": "ok"}'
    array = tmp_path / "code.json"
    array.write_text(f"[{GOOD}, {huge}, {GOOD}, {huge}]")
    result = read("code_alpaca", array, skip=True)
    assert len(result.units) == 2 and result.records == 4 and result.drops == {BAD_RECORD: 2}


def test_json_array_records_count_from_one_like_lines(tmp_path):
    array = tmp_path / "code.json"
    array.write_text(f"[\n  {GOOD},\n  {GOOD}\n]\n")
    assert [where for where, _ in read_records(array, BadRecords(skip=False))] == ["record 1 (line 2)",
                                                                                  "record 2 (line 3)"]
    array.write_text(f"[{GOOD}, {GOOD},\n" + json.dumps({"instruction": "Do", "input": ""}) + "]")
    with pytest.raises(DataError, match=r"code.json: record 3 \(line 2\): field 'output': missing"):
        read_units("code_alpaca", array)


def test_a_csv_field_longer_than_the_csv_module_default_limit_is_read(tmp_path):
    """csv's default field_size_limit (131,072) would make the rest of the file unreadable; it is raised while
    our reader reads and set back after."""
    before = csv.field_size_limit()
    long_answer = "x" * 300_000
    path = tmp_path / "gsm.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerows([["INSTRUCTION", "RESPONSE"], ["q1", long_answer], ["q2", "a2"]])
    conversations = flat(read_units("grade_school_math_instructions", path))
    assert [texts(c) for c in conversations] == [[("prompter", "q1"), ("assistant", long_answer)],
                                                 [("prompter", "q2"), ("assistant", "a2")]]
    assert csv.field_size_limit() == before


def test_dolly_metadata_string_with_an_integer_longer_than_python_reads_is_a_bad_record():
    from gptneox.data.readers import RecordError
    record = {"INSTRUCTION": "Who?", "RESPONSE": "Him.", "METADATA": '{"CONTEXT": "x", "n": ' + "1" * 5000 + "}"}
    with pytest.raises(RecordError, match="field 'METADATA': a string that cannot be read as a JSON object"):
        run(dolly15k, record)
