"""Real data as users have it: hub oasst rows and shards, ShareGPT as it is, GSM8K originals, chat and alpaca
records, JSON Lines under a .json name. Fixtures: tests/fixtures/data/ (see make_fixtures.py there)."""
from __future__ import annotations

import gzip
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gptneox.data import DataError, build_datasets
from gptneox.data.datasets import load_datasets, read_units
from gptneox.data.files import dataset_files
from gptneox.data.readers import RecordError
from gptneox.data.sources import grade_school_math_instructions

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "fixtures" / "data"
HUB = DATA / "oasst_hub" / "data"
LANGS = {"lang": "en,de"}


def texts(units):
    return [[(m["role"], m["text"]) for m in conversation] for unit in units for conversation in unit]


# --- oasst_export: the tree export and the hub's message rows ----------------------------------------------


def test_both_oasst_layouts_give_the_same_threads_and_the_same_drops():
    trees = read_units("oasst_export", DATA / "oasst_trees.jsonl.gz", converter_options=LANGS)
    rows = read_units("oasst_export", DATA / "oasst_messages.jsonl.gz", converter_options=LANGS)
    shards = read_units("oasst_export", dataset_files("oasst_export", str(HUB), "."), converter_options=LANGS)
    assert texts(rows.units) == texts(trees.units)  # same order too: rows are in tree order
    assert sorted(texts(shards.units)) == sorted(texts(trees.units))  # shards hold the trees in another order
    assert [[m[1] for m in t] for t in texts(trees.units)] == [
        ["What is a meme?", "A meme is an idea that spreads from person to person.", "Who coined the word?",
         "Richard Dawkins, in The Selfish Gene (1976)."],
        ["What is a meme?", "An image with a caption that people share online."],  # prompter leaf dropped
        ["Was ist ein Meme?", "Ein Meme ist eine Idee, die sich verbreitet."],
        ["Was ist ein Meme?", "Ein Bild mit Text."],
        ["Name a colour.", "Blue.", "Another one?", "Green."]]
    expected_drops = {"language": 1, "review state": 2, "thread with a deleted/synthetic message": 2}
    assert trees.drops == rows.drops == shards.drops == expected_drops
    assert len(shards.units) == len(trees.units) == 3  # the tree cut over two shards is one unit
    assert (trees.records, rows.records, shards.records) == (6, 22, 22)


def test_oasst_rows_split_keeps_a_tree_that_spans_shards_on_one_side(tmp_path):
    for seed in range(6):
        train, evals = build_datasets([{"oasst_export": {**LANGS, "input_file_path": str(HUB), "val_split": 0.34}}],
                                      cache_dir=tmp_path, seed=seed)
        meme = [t for t in train + evals.get("oasst_export", []) if t[0]["text"] == "What is a meme?"]
        assert len(meme) == 2
        assert all(t in train for t in meme) or all(t not in train for t in meme)


def test_input_file_path_list_glob_and_directory_agree():
    as_dir = dataset_files("oasst_export", "oasst_hub/data", DATA)
    as_glob = dataset_files("oasst_export", "oasst_hub/data/*.parquet", DATA)
    as_list = dataset_files("oasst_export", [f"oasst_hub/data/{p.name}" for p in as_dir], DATA)
    assert as_dir == as_glob == as_list
    assert [p.name for p in as_dir] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet",
                                        "validation-00000-of-00001.parquet"]
    with pytest.raises(DataError, match=r"dataset 'oasst_export': no file matches .*nothing-\*\.parquet"):
        dataset_files("oasst_export", "nothing-*.parquet", DATA)
    with pytest.raises(DataError, match="names .* more than once"):
        dataset_files("oasst_export", ["oasst_trees.jsonl.gz", "oasst_trees.jsonl.gz"], DATA)


def hub_rows():
    with gzip.open(DATA / "oasst_messages.jsonl.gz", "rt") as stream:
        return [json.loads(line) for line in stream]


def test_a_row_whose_parent_is_missing_is_a_bad_record_of_its_tree(tmp_path, caplog):
    rows = [row for row in hub_rows() if row["message_id"] != "k3"]  # k4's parent
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"messages.jsonl: message tree 'b7a1c9e2.*' \(first row: line 19\): "
                                        r"field 'parent_id': messages.jsonl line 21: parent 'k3' of message 'k4'"):
        read_units("oasst_export", path, converter_options=LANGS)
    with caplog.at_level(logging.WARNING):
        read = read_units("oasst_export", path, skip=True, converter_options=LANGS)
    assert read.drops["bad record"] == 1 and len(read.units) == 2  # only that tree is lost
    assert "skipped 1 bad record(s)" in caplog.text


def test_oasst_rows_with_float_ranks_as_pandas_writes_them(tmp_path):
    rows = hub_rows()
    for row in rows:
        row["rank"] = None if row["rank"] is None else float(row["rank"])
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with_floats = read_units("oasst_export", path, converter_options={**LANGS, "top_k": 1})
    with_ints = read_units("oasst_export", DATA / "oasst_messages.jsonl.gz", converter_options={**LANGS, "top_k": 1})
    assert texts(with_floats.units) == texts(with_ints.units) and with_ints.drops["thread with an assistant " \
                                                                               "ranked >= top_k or unranked"] == 2


# --- ShareGPT as it is ---------------------------------------------------------------------------------


def test_sharegpt_odd_records_are_dropped_and_counted_never_an_error():
    read = read_units("vicuna", DATA / "ShareGPT_V3_unfiltered_cleaned_split.json")
    assert read.records == 9
    assert read.drops == {"empty": 1, "not starting with a human turn": 1, "no assistant reply": 1,
                          "system or unknown speaker after the first turn": 1}
    assert texts(read.units) == [
        [("prompter", "Summarize this _text_ please."), ("assistant", "It says **bold** things."),
         ("prompter", "Shorter?"), ("assistant", "Bold things.")],
        [("system", "You are ChatGPT."), ("prompter", "Hi"), ("assistant", "Hello!")],  # a leading system turn
        [("prompter", "Write a haiku."), ("assistant", "Autumn moonlight")],  # user / chatgpt
        [("prompter", "Weather?"), ("assistant", "Sunny."), ("prompter", "Tomorrow?"), ("assistant", "Rain.")],
        [("prompter", "Part one\npart two"), ("assistant", "Both parts read.")]]


@pytest.mark.parametrize("record, field", [
    ("[1, 2]", "conversations"),
    ({"id": "x"}, "conversations"),
    ({"conversations": [{"from": "human"}]}, r"conversations\[0\].value"),
    ({"conversations": ["hello"]}, r"conversations\[0\].from"),
])
def test_unreadable_sharegpt_records_are_bad_records_naming_the_field(tmp_path, record, field):
    path = tmp_path / "share.json"
    path.write_text(json.dumps([{"conversations": []}, record]))
    with pytest.raises(DataError, match=rf"share.json: record 2 \(line 1\): field '{field}'"):
        read_units("vicuna", path)
    assert read_units("vicuna", path, skip=True).drops == {"empty": 1, "bad record": 1}


# --- GSM8K originals, dolly as JSON Lines under .json, chat, alpaca ---------------------------------------


def test_gsm8k_originals_lose_calculator_marks_and_the_final_line():
    (first, second) = texts(read_units("grade_school_math_instructions", DATA / "gsm8k_train.jsonl").units)
    assert first[0][1].startswith("Natalia sold clips to 48 of her friends")  # the question as it is
    assert first[1] == ("assistant", "Natalia sold 48/2 = 24 clips in May.\n"
                                     "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert "<<" not in second[1][1] and "####" not in second[1][1]
    record = {"question": "q", "answer": "a = <<1+1=2>>2.\n#### 2"}
    kept = grade_school_math_instructions(record, Counter(), keep_final_answer=True)
    assert kept[0][1]["text"] == "a = 2.\nThe answer is 2."
    with pytest.raises(RecordError, match="field 'answer': has no final '#### <number>' line"):
        grade_school_math_instructions({"question": "q", "answer": "no result"}, Counter())


def test_json_lines_under_a_json_name_is_detected_and_dolly_letters_of_both_cases_go():
    conversations = texts(read_units("dolly15k", DATA / "databricks-dolly-15k.json").units)
    assert conversations[0][0] == ("prompter", "The Selfish Gene is a 1976 book. Who wrote The Selfish Gene?")
    assert len(conversations) == 2


def test_chat_source_system_turn_and_drops(tmp_path):
    read = read_units("chat", DATA / "chat.jsonl")
    assert texts(read.units) == [
        [("system", "You answer in one word."), ("prompter", "Capital of France?"), ("assistant", "Paris.")],
        [("prompter", "2+2?"), ("assistant", "4"), ("prompter", "And 3+3?"), ("assistant", "6")]]
    assert read.drops == {"not starting with a human turn": 1, "empty": 1}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]}))
    with pytest.raises(DataError, match=r"line 1: field 'messages\[1\].role': unknown role 'tool'"):
        read_units("chat", path)


def test_chat_content_parts_in_both_spellings_are_joined_and_other_parts_are_bad_records(tmp_path):
    openai = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "text", "text": "a cat."}]},
        {"role": "assistant", "content": "Small, furry."}]}
    llama_factory = {"messages": [{"role": "user", "content": [{"type": "text", "value": "Hi?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "value": "Hello."}]}]}
    picture = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}]},
        {"role": "assistant", "content": "A cat."}]}
    path = tmp_path / "parts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (openai, llama_factory, picture)) + "\n")
    with pytest.raises(DataError, match=r"parts.jsonl: line 3: field 'messages\[0\].content\[1\].type': a 'image_url' "
                                        r"part; only text parts can be trained \(set skip_bad_records"):
        read_units("chat", path)
    read = read_units("chat", path, skip=True)
    assert texts(read.units) == [
        [("system", "Be brief."), ("prompter", "Describe a cat."), ("assistant", "Small, furry.")],
        [("prompter", "Hi?"), ("assistant", "Hello.")]]
    assert read.drops == {"bad record": 1} and read.records == 3


def test_chat_content_parts_from_parquet_carry_both_keys_with_nulls(tmp_path):
    part = pa.struct([("type", pa.string()), ("text", pa.string()), ("value", pa.string())])
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.list_(part))])))])
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": None, "value": "Hi?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Yes.", "value": None}]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": None, "value": None}]}]}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "parts.parquet")
    with pytest.raises(DataError, match=r"row 1: field 'messages\[0\].content\[0\].text': missing"):
        read_units("chat", tmp_path / "parts.parquet")
    assert texts(read_units("chat", tmp_path / "parts.parquet", skip=True).units) == [
        [("prompter", "Hi?"), ("assistant", "Yes.")]]


def test_fastchat_top_level_system_becomes_the_system_turn(tmp_path):
    records = [{"id": "a", "system": "You are a pirate.", "conversations": [
                   {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr."}]},
               {"id": "b", "system": "", "conversations": [
                   {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
               {"id": "c", "system": "Ignored with its conversation.",
                "conversations": [{"from": "gpt", "value": "x"}]},
               {"id": "d", "system": ["not", "text"], "conversations": []}]
    path = tmp_path / "fastchat.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 4 \(line 1\): field 'system': expected str, got list"):
        read_units("vicuna", path)
    read = read_units("vicuna", path, skip=True)
    assert texts(read.units) == [[("system", "You are a pirate."), ("prompter", "Hi"), ("assistant", "Arr.")],
                                 [("prompter", "Hi"), ("assistant", "Hello.")]]
    assert read.drops == {"not starting with a human turn": 1, "bad record": 1}



def sharegpt(*turns, **fields):
    return {"conversations": [{"from": speaker, "value": value} for speaker, value in turns], **fields}


def test_a_leading_sharegpt_system_turn_becomes_the_system_turn_like_a_top_level_system(tmp_path):
    """axolotl, LLaMA-Factory, OpenHermes and SlimOrca write the system prompt as the first turn."""
    records = [sharegpt(("system", "You are a pirate."), ("human", "Hi"), ("gpt", "Arr.")),
               sharegpt(("human", "Hi"), ("gpt", "Arr."), system="You are a pirate."),  # FastChat's top-level one
               sharegpt(("system", ""), ("human", "Hi"), ("gpt", "Hello.")),  # an empty one is no system turn
               sharegpt(("human", "Hi"), ("system", "Be brief."), ("gpt", "Hi.")),  # later: another speaker
               sharegpt(("system", "Be brief."), ("gpt", "Hi.")),  # no human turn after it
               sharegpt(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hi."), system="Be brief.")]
    path = tmp_path / "openhermes.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"openhermes.json: record 6 \(line 1\): field 'conversations\[0\].from': a "
                                        r"system turn, and the record also has a top-level 'system' string; keep one"):
        read_units("vicuna", path)
    read = read_units("vicuna", path, skip=True)
    pirate = [("system", "You are a pirate."), ("prompter", "Hi"), ("assistant", "Arr.")]
    assert texts(read.units) == [pirate, pirate, [("prompter", "Hi"), ("assistant", "Hello.")]]
    assert read.drops == {"system or unknown speaker after the first turn": 1, "not starting with a human turn": 1,
                          "bad record": 1}


def test_openai_chat_weight_zero_is_a_bad_record_never_silently_trained(tmp_path):
    def record(weight, role="assistant"):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
        messages[0 if role == "user" else 1]["weight"] = weight
        return {"messages": messages}

    path = tmp_path / "openai.jsonl"
    lines = [record(1), record(None), record(0, role="user"), record(0), record(0.5), record(True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError, match=r"openai.jsonl: line 4: field 'messages\[1\].weight': 0 asks not to train "
                                        r"this assistant turn, .*the turn would be trained \(remove the turn, or "
                                        r"set weight 1\) \(set skip_bad_records"):
        read_units("chat", path)
    read = read_units("chat", path, skip=True)
    assert texts(read.units) == [[("prompter", "Hi"), ("assistant", "Hello.")]] * 3
    assert read.drops == {"bad record": 3} and read.records == 6
    path.write_text(json.dumps(record(0.5)) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'messages\[1\].weight': 0.5; expected 1"):
        read_units("chat", path)
    path.write_text(json.dumps(record(True)) + "\n")
    with pytest.raises(DataError, match=r"line 1: field 'messages\[1\].weight': True; expected 1"):
        read_units("chat", path)


def test_alpaca_source_reads_the_stanford_json_array():
    assert texts(read_units("alpaca", DATA / "alpaca_data.json").units) == [
        [("prompter", "Give three tips for staying healthy."), ("assistant", "1. Eat well.\n2. Exercise.\n3. Sleep.")],
        [("prompter", "Translate to French.\nGood morning"), ("assistant", "Bonjour")]]


# --- the stock oasst-mix on these layouts; every dataset's one log line --------------------------------------


def stock_cache(tmp_path: Path) -> Path:
    """The default file names of oasst-mix, holding the real layouts (oasst as hub message rows)."""
    shutil.copy(DATA / "oasst_messages.jsonl.gz", tmp_path / "2023-04-12_oasst_release_ready_synth.jsonl.gz")
    shutil.copy(DATA / "ShareGPT_V3_unfiltered_cleaned_split.json",
                tmp_path / "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json")
    shutil.copy(DATA / "databricks-dolly-15k.json", tmp_path / "databricks-dolly-15k.jsonl")
    (tmp_path / "grade-school-math-instructions.csv").write_text('INSTRUCTION,RESPONSE\n"1+1?","2"\n')
    shutil.copy(DATA / "alpaca_data.json", tmp_path / "code_alpaca_20k.json")
    return tmp_path


def test_stock_oasst_mix_reads_these_layouts_and_logs_one_line_per_dataset(tmp_path, caplog):
    mix = yaml.safe_load((REPO / "configs" / "oasst-mix.yaml").read_text())["oasst-mix"]["datasets"]
    with caplog.at_level(logging.INFO, logger="gptneox.data.datasets"):
        datasets = load_datasets(mix, cache_dir=stock_cache(tmp_path), seed=0)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 5 and [d.name for d in datasets] == [line.split(":")[0] for line in lines]
    assert lines[1].startswith("vicuna: 9 records read from ") and "5 conversations made" in lines[1]
    assert ("dropped: empty 1, no assistant reply 1, not starting with a human turn 1, "
            "system or unknown speaker after the first turn 1") in lines[1]
    assert "22 records read" in lines[0] and "review state 2" in lines[0]


def test_a_dataset_with_no_conversations_is_named_and_an_empty_training_set_is_refused(tmp_path, caplog):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "questions.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi?"}]}]))
    config = [{"chat": {"input_file_path": "empty.jsonl"}}, {"vicuna": {"input_file_path": "questions.json"}}]
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="the training set is empty"):
        build_datasets(config, cache_dir=tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.split(":")[0] for w in warnings] == ["dataset chat gives no conversations",
                                                   "dataset vicuna gives no conversations"]
    assert "no assistant reply 1" in warnings[1]
