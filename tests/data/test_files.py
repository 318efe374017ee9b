"""Folders written by `datasets`' save_to_disk are read with pyarrow alone, streamed like parquet.

The folders are built as datasets writes them (arrow_dataset.py `save_to_disk`, arrow_writer.py): shards
`data-0000i-of-0000n.arrow` in the Arrow IPC *stream* format whose schema carries the features under the
`huggingface` metadata key, `dataset_info.json`, and `state.json` (indent 2, sorted keys) listing the shards
under `_data_files`; a DatasetDict adds `dataset_dict.json` and one such folder per split. Checked once by hand
against datasets 5.2.0 (not a dependency): its save_to_disk output has exactly these files, keys and schema
metadata and is read here to the same records, and its load_from_disk loads this builder's folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from gptneox.data import DataError
from gptneox.data.datasets import load_datasets, read_units
from gptneox.data.files import dataset_files

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
FEATURES = {"messages": {"feature": {"role": {"dtype": "string", "_type": "Value"},
                                     "content": {"dtype": "string", "_type": "Value"}}, "_type": "List"}}


def chat_rows(n: int, start: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(start, start + n)]


def save_to_disk(folder: Path, shards: list[list[dict]], split: str | None = "train", batch_rows: int = 1000) -> Path:
    folder.mkdir(parents=True)
    schema = pa.schema([("messages", MESSAGES)],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, rows in zip(names, shards):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for first in range(0, len(rows), batch_rows):
                writer.write_batch(pa.RecordBatch.from_pylist(rows[first:first + batch_rows], schema=schema))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"citation": "", "description": "", "features": FEATURES, "homepage": "", "license": ""}, indent=2))
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "3b6f0ec2b1c8e8a1",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": split}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    return folder


def test_a_saved_dataset_reads_its_shards_in_state_json_order_like_the_same_rows_as_json_lines(tmp_path):
    folder = save_to_disk(tmp_path / "chats", [chat_rows(3), chat_rows(2, start=3)])
    (folder / "cache-1a2b3c.arrow").write_bytes(b"left by .map(), not listed in state.json")
    assert [p.name for p in dataset_files("chat", "chats", tmp_path)] == ["data-00000-of-00002.arrow",
                                                                          "data-00001-of-00002.arrow"]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(5)))
    saved, lines = load_datasets([{"chat": {"input_file_path": "chats", "val_split": 0.4}}], tmp_path), \
        load_datasets([{"chat": {"input_file_path": "chats.jsonl", "val_split": 0.4}}], tmp_path)
    assert (saved[0].records, saved[0].train, saved[0].eval) == (lines[0].records, lines[0].train, lines[0].eval)
    assert saved[0].records == 5 and len(saved[0].train) == 3


def test_a_saved_dataset_dict_reads_its_train_and_validation_splits(tmp_path):
    root = tmp_path / "dict"
    for split, rows in (("train", chat_rows(2)), ("validation", chat_rows(1, 2)), ("test", chat_rows(4, 3))):
        save_to_disk(root / split, [rows], split=split)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    files = dataset_files("chat", "dict", tmp_path)
    assert [str(p.relative_to(root)) for p in files] == ["train/data-00000-of-00001.arrow",
                                                         "validation/data-00000-of-00001.arrow"]
    assert dataset_files("chat", "dict/test", tmp_path) == [root / "test" / "data-00000-of-00001.arrow"]


@pytest.mark.parametrize("state, message", [
    ({"_data_files": [{"filename": "data-00009-of-00010.arrow"}]}, r"_data_files\[0\] names data-00009-of-00010.arrow, "
                                                                  r"which is not in"),
    ({"_data_files": [{"filename": "../other/data.arrow"}]}, r"_data_files\[0\] must be \{\"filename\": NAME\}"),
    ({"_fingerprint": "x"}, "no '_data_files' key"),
    ({"_data_files": [], "_indices_data_files": [{"filename": "indices.arrow"}]}, "has an indices mapping"),
])
def test_a_broken_state_json_is_one_line_naming_it(tmp_path, state, message):
    folder = save_to_disk(tmp_path / "chats", [chat_rows(1)])
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(DataError, match=message):
        dataset_files("chat", "chats", tmp_path)


def test_arrow_is_streamed_batch_by_batch_and_a_damaged_stream_names_the_row(tmp_path):
    folder = save_to_disk(tmp_path / "chats", [chat_rows(30)], batch_rows=10)
    shard = folder / "data-00000-of-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[:-40])  # the third (last) batch is cut short
    with pytest.raises(DataError, match=r"data-00000-of-00001.arrow: cannot read arrow file after row 20"):
        read_units("chat", shard)
    shard.write_bytes(b"PAR1 not an arrow stream")
    with pytest.raises(DataError, match="after row 0: .*expected the Arrow IPC stream format that datasets writes"):
        read_units("chat", shard)


def test_an_unknown_split_of_a_saved_dataset_dict_names_its_splits(tmp_path):
    root = tmp_path / "alpaca_dd"
    for split in ("train", "test"):
        save_to_disk(root / split, [chat_rows(1)], split=split)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=r"dataset 'chat': file not found: .*alpaca_dd/nope; .*alpaca_dd is a "
                                        r"DatasetDict folder written by save_to_disk whose splits are train, test$"):
        dataset_files("chat", "alpaca_dd/nope", tmp_path)
    (root / "dataset_dict.json").write_text('{"splits": [' + "1" * 5000 + "]}")  # unreadable: it is said so
    with pytest.raises(DataError, match=r"file not found: .*alpaca_dd/nope; .*but .*dataset_dict.json: unreadable"):
        dataset_files("chat", "alpaca_dd/nope", tmp_path)


def test_a_state_json_with_an_integer_longer_than_python_reads_is_one_line(tmp_path):
    folder = save_to_disk(tmp_path / "chats", [chat_rows(1)])
    (folder / "state.json").write_text('{"_data_files": [], "_fingerprint": ' + "7" * 5000 + "}")
    with pytest.raises(DataError, match=r"state.json: unreadable \(Exceeds the limit"):
        dataset_files("chat", "chats", tmp_path)
