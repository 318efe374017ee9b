"""build_datasets: the sample mix, a leak-free deterministic split, max_val_set, fraction, config errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gptneox.data import DataError, build_datasets
from gptneox.data.datasets import parse_entry

ROOT = Path(__file__).resolve().parents[2]


def section(name):
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())[name]


def key(conversation):
    return json.dumps(conversation, sort_keys=True)


def write_trees(path: Path, count: int) -> Path:
    """``count`` oasst trees with unique root texts and 1-3 answers each (so 1-3 threads per tree)."""
    lines = []
    for i in range(count):
        answers = [{"role": "assistant", "text": f"A{i}.{j}", "rank": j, "replies": []} for j in range(1 + i % 3)]
        root = {"role": "prompter", "text": f"Q{i}", "lang": "en", "review_result": True, "replies": answers}
        lines.append(json.dumps({"message_tree_id": str(i), "tree_state": "ready_for_export", "prompt": root}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sample_mix_builds_every_dataset_with_eval_sets():
    config = section("sample-mix")
    train, evals = build_datasets(config["datasets"], cache_dir=ROOT / config["cache_dir"], seed=0)
    assert set(evals) == {"oasst_export", "vicuna", "dolly15k", "grade_school_math_instructions", "code_alpaca"}
    assert len(train) > 200
    assert len(evals["vicuna"]) == 3 and len(evals["code_alpaca"]) == 4  # max_val_set
    assert not {key(c) for c in train} & {key(c) for c in evals["grade_school_math_instructions"]}


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path):
    write_trees(tmp_path / "trees.jsonl", 60)
    config = [{"oasst_export": {"input_file_path": "trees.jsonl"}}]
    first = build_datasets(config, cache_dir=tmp_path, seed=5)
    assert build_datasets(config, cache_dir=tmp_path, seed=5) == first
    other = build_datasets(config, cache_dir=tmp_path, seed=6)
    assert other != first
    assert sorted(map(key, other[0] + other[1]["oasst_export"])) == sorted(map(key, first[0] + first[1]["oasst_export"]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oasst_split_keeps_each_tree_on_one_side(tmp_path, seed):
    write_trees(tmp_path / "trees.jsonl", 50)
    train, evals = build_datasets([{"oasst_export": {"input_file_path": "trees.jsonl"}}], tmp_path, seed)
    train_roots = {c[0]["text"] for c in train}
    val_roots = {c[0]["text"] for c in evals["oasst_export"]}
    assert not train_roots & val_roots
    assert len(val_roots) == 10  # val_split defaults to 0.2, counted in trees
    assert len(train_roots) == 40
    assert len(train) + len(evals["oasst_export"]) == sum(1 + i % 3 for i in range(50))


def test_max_val_set_samples_without_replacement_and_fraction(tmp_path):
    rows = [json.dumps({"instruction": f"task {i}", "input": "", "output": f"out {i}"}) for i in range(100)]
    (tmp_path / "code.jsonl").write_text("\n".join(rows) + "\n")
    options = {"input_file_path": "code.jsonl", "val_split": 0.5, "max_val_set": 20, "fraction": 0.3}
    train, evals = build_datasets([{"code_alpaca": options}], tmp_path, seed=0)
    val = evals["code_alpaca"]
    assert len(val) == 20 and len({key(c) for c in val}) == 20
    assert len(train) == 15 and len({key(c) for c in train}) == 15
    assert not {key(c) for c in train} & {key(c) for c in val}


def test_val_split_zero_gives_no_eval_set(tmp_path):
    (tmp_path / "code.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    train, evals = build_datasets([{"code_alpaca": {"input_file_path": "code.jsonl", "val_split": 0}}], tmp_path)
    assert len(train) == 1 and evals == {}


@pytest.mark.parametrize("config, message", [
    ([{"webgpt": {}}], "unknown dataset 'webgpt'; known datasets: oasst_export"),
    ([{"vicuna": {"val_splt": 0.1}}], "dataset 'vicuna': unknown option.*val_splt"),
    ([{"vicuna": {"top_k": 1}}], "dataset 'vicuna': unknown option.*top_k"),
    ([{"vicuna": {"val_split": "a lot"}}], "option val_split must be a number"),
    ([{"vicuna": {"val_split": 1.5}}], "val_split = 1.5 is outside"),
    ([{"vicuna": {"max_val_set": 2.5}}], "max_val_set must be an integer"),
    ([{"vicuna": {}}, "vicuna"], "vicuna listed more than once"),
    ([{"vicuna": {}, "dolly15k": {}}], "not a dataset name or a one-key"),
    ({"vicuna": {}}, "must be a list"),
    ([{"oasst_export": {}}], "oasst_export' needs the option input_file_path"),
    ([{"vicuna": {"skip_bad_records": "yes"}}], "skip_bad_records must be true or false"),
])
def test_config_errors_name_the_problem(tmp_path, config, message):
    with pytest.raises(DataError, match=message):
        build_datasets(config, cache_dir=tmp_path)


def test_oasst_mix_is_valid_and_names_missing_files(tmp_path):
    config = section("oasst-mix")
    assert [parse_entry(e)[0] for e in config["datasets"]] == [
        "oasst_export", "vicuna", "dolly15k", "grade_school_math_instructions", "code_alpaca"]
    with pytest.raises(DataError, match="2023-04-12_oasst_release_ready_synth.jsonl.gz"):
        build_datasets(config["datasets"], cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json \(default file name.*"
                                        r"hf download anon8231489123/ShareGPT_Vicuna_unfiltered --repo-type dataset"):
        build_datasets(config["datasets"][1:], cache_dir=tmp_path)
