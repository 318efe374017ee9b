"""Hub datasets from the Hugging Face cache, offline: hf:// paths, the seed mix found in the reference's hub
repos, and what a resume and the data report see of them. The cache is a stand-in laid out exactly as
huggingface_hub writes it (tests/data/hub_cache.py)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from gptneox.data import DataError
from gptneox.data.datasets import load_datasets, merge_datasets, read_units
from gptneox.data.files import dataset_files
from gptneox.data.hub_datasets import parse_hub_path
from gptneox.training.resume_check import ResumeMismatch, check_resume, dataset_fingerprint

from tests.data.hub_cache import COMMITS, DOLLY_ROWS, add_snapshot, reference_cache, reference_repos
from tests.helpers import REPO

SAMPLE = REPO / "data" / "sample"
OASST1 = "OpenAssistant/oasst1"


def seed_mix() -> list:
    return yaml.safe_load((REPO / "gptneox" / "configs" / "oasst-mix.yaml").read_text())["oasst-mix"]["datasets"]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the cache is found through HF_HOME/hub
    return cache


def relative(files: list[Path], snapshot_root: Path) -> list[str]:
    return [str(f.relative_to(snapshot_root)) for f in files]


# --- hf:// paths ----------------------------------------------------------------------------------------


def test_hf_paths_name_a_file_a_glob_or_a_whole_repo_in_the_refs_main_snapshot(hub, tmp_path):
    files = reference_repos()[OASST1]
    old = add_snapshot(hub, OASST1, "a" * 40, {"data/train-00000-of-00001-old.parquet": b"PAR1"}, main=False)
    current = add_snapshot(hub, OASST1, COMMITS[OASST1], files)
    os.utime(old, (2e9, 2e9))  # the newest by time, but refs/main names the other one
    shard = "data/train-00000-of-00001-7eb1a25206d2071c.parquet"
    assert dataset_files("x", f"hf://datasets/{OASST1}/{shard}", tmp_path) == [current / shard]
    assert relative(dataset_files("x", f"hf://datasets/{OASST1}/data/*.parquet", tmp_path), current) == [
        shard, "data/validation-00000-of-00001-134b8fd0c89408b6.parquet"]
    whole = dataset_files("x", f"hf://datasets/{OASST1}", tmp_path)  # the split files, not the jsonl.gz export
    assert whole == dataset_files("x", f"hf://datasets/{OASST1}/data/*.parquet", tmp_path)
    assert relative(dataset_files("x", f"hf://datasets/{OASST1}/2023-04-12_oasst_ready.trees.jsonl.gz",
                                  tmp_path), current) == ["2023-04-12_oasst_ready.trees.jsonl.gz"]
    assert dataset_files("x", f"hf://datasets/{OASST1}@{'a' * 40}", tmp_path) == [
        old / "data/train-00000-of-00001-old.parquet"]
    # both layouts of the hub repo give the same threads as the fixture's local files
    export = dataset_files("x", f"hf://datasets/{OASST1}/2023-04-12_oasst_ready.trees.jsonl.gz", tmp_path)
    rows = read_units("oasst_export", whole, converter_options={"lang": "en,de"})
    trees = read_units("oasst_export", export, converter_options={"lang": "en,de"})
    assert sorted(map(str, rows.units)) == sorted(map(str, trees.units)) and len(trees.units) == 3


def test_a_snapshot_missing_a_blob_gives_way_to_the_newest_complete_one(hub, tmp_path, caplog):
    name = "data/train-00000-of-00001.parquet"
    good = add_snapshot(hub, "OpenAssistant/oasst2", "b" * 40, {name: b"PAR1 old"}, main=False)
    pruned = add_snapshot(hub, "OpenAssistant/oasst2", "c" * 40, {name: b"PAR1 new"})
    (pruned / name).resolve().unlink()  # `hf cache prune` / a deleted blob leaves a dangling link
    assert dataset_files("x", "hf://datasets/OpenAssistant/oasst2/" + name, tmp_path) == [good / name]
    # said, not silent: the data read is older than refs/main's
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"dataset x: {pruned} ({name} links to a missing blob) passed over; reading the older snapshot {'b' * 40} "
        f"(hf download OpenAssistant/oasst2 --repo-type dataset completes the newest)"]
    (good / name).resolve().unlink()
    with pytest.raises(DataError) as error:
        dataset_files("x", "hf://datasets/OpenAssistant/oasst2", tmp_path)
    assert f"{pruned} ({name} links to a missing blob)" in str(error.value)


def test_a_missing_repo_is_one_line_naming_every_place_looked_and_the_download_command(hub, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError) as error:
        load_datasets([{"chat": {"input_file_path": "hf://datasets/me/my-chats/train.jsonl"}}], tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "dataset 'chat': hf://datasets/me/my-chats/train.jsonl is not in the Hugging Face cache")
    for place in (tmp_path / "elsewhere", hub, tmp_path / "home" / ".cache" / "huggingface" / "hub"):
        assert f"{place / 'datasets--me--my-chats'} (not there)" in message
    assert message.endswith("`hf download me/my-chats --repo-type dataset`")
    add_snapshot(hub, "me/my-chats", "d" * 40, {"README.md": b"---\n---\n"})
    with pytest.raises(DataError, match=r"snapshots/d{40} \(no train.jsonl\)"):
        load_datasets([{"chat": {"input_file_path": "hf://datasets/me/my-chats/train.jsonl"}}], tmp_path)
    with pytest.raises(DataError, match=r"--repo-type dataset --revision v2`$"):
        load_datasets([{"chat": {"input_file_path": "hf://datasets/me/my-chats@v2"}}], tmp_path)


def test_the_data_report_stops_on_a_missing_repo_with_that_one_line(hub, tmp_path, capsys):
    from gptneox.cli import data_report

    mix = tmp_path / "mix.yaml"
    chats = {"chat": {"input_file_path": "hf://datasets/me/my-chats"}}
    mix.write_text(yaml.safe_dump({"mix": {"datasets": [chats]}}))
    status = data_report.main(["--configs", "defaults", "tiny", str(mix), "--tokenizer_path",
                               str(SAMPLE / "tokenizer.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].split(": error: ")[1].startswith(
        "dataset 'chat': hf://datasets/me/my-chats is not in the Hugging Face cache (looked at: ")
    assert err[-1].endswith("`hf download me/my-chats --repo-type dataset`")


@pytest.mark.parametrize("spec, problem", [
    ("hf://stabilityai/stablelm-base-alpha-7b/config.json", "is not a hub dataset path"),
    ("hf://datasets/onlyorg", "does not name a repo"),
    ("hf://datasets/org/name@", "is not a valid hub dataset path"),
    ("hf://datasets/org/name/../../models--x/config.json", "is not a valid hub dataset path"),
])
def test_malformed_hf_paths_are_named(spec, problem):
    with pytest.raises(DataError, match=f"dataset 'chat': '{spec}' {problem}"):
        parse_hub_path("chat", spec)


# --- the seed mix from the reference's hub repos ----------------------------------------------------------


def test_every_source_of_the_seed_mix_is_found_in_its_reference_repo_and_named_in_its_log_line(hub, tmp_path,
                                                                                                 caplog):
    reference_cache(hub)
    with caplog.at_level(logging.INFO, logger="gptneox.data"):
        datasets = load_datasets(seed_mix(), cache_dir=tmp_path / "empty", seed=0)
    snapshot = {name: hub / f"datasets--{repo.replace('/', '--')}" / "snapshots" / COMMITS[repo]
                for name, repo in [("oasst_export", OASST1), ("vicuna", "anon8231489123/ShareGPT_Vicuna_unfiltered"),
                                   ("dolly15k", "OllieStanley/oa_dolly_15k"),
                                   ("grade_school_math_instructions", "qwedsacf/grade-school-math-instructions"),
                                   ("code_alpaca", "sahil2801/CodeAlpaca-20k")]}
    read = {d.name: relative(d.files, snapshot[d.name]) for d in datasets}
    assert read == {
        "oasst_export": ["data/train-00000-of-00001-7eb1a25206d2071c.parquet",
                         "data/validation-00000-of-00001-134b8fd0c89408b6.parquet"],
        "vicuna": ["ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json"],  # the named file, not the others
        "dolly15k": ["data/train-00000-of-00001-4ad930cdd7ee7fb7.parquet"],
        "grade_school_math_instructions": ["data/train-00000-of-00001-3f5d416810641542.parquet"],
        "code_alpaca": ["code_alpaca_20k.json"]}
    counts = {d.name: (d.records, d.conversations, dict(d.drops)) for d in datasets}
    assert counts == {
        "oasst_export": (22, 5, {"language": 1, "review state": 2, "thread with a deleted/synthetic message": 2}),
        "vicuna": (9, 5, {"empty": 1, "no assistant reply": 1, "not starting with a human turn": 1,
                          "system or unknown speaker after the first turn": 1}),
        "dolly15k": (3, 3, {}), "grade_school_math_instructions": (3, 3, {}), "code_alpaca": (3, 2, {"banned word": 1})}
    lines = [r.getMessage() for r in caplog.records]  # each dataset's start-up line names what it read
    assert lines == [d.summary() for d in datasets]
    assert lines[0].startswith(f"oasst_export: 22 records read from 2 files in {snapshot['oasst_export'] / 'data'},")
    assert lines[1].startswith(f"vicuna: 9 records read from {snapshot['vicuna']}/ShareGPT_V3_unfiltered_cleaned_"
                               "split_no_imsorry.json,")
    dolly = next(d for d in datasets if d.name == "dolly15k")
    assert sorted(c[0]["text"] for c in dolly.train + dolly.eval) == [
        "Give me a fruit.", "Name a primary colour.",
        "The Selfish Gene is a 1976 book by Richard Dawkins. Who wrote The Selfish Gene?"]


def test_a_file_in_cache_dir_wins_over_the_hub_and_a_named_file_is_never_replaced(hub, tmp_path):
    reference_cache(hub)
    (tmp_path / "code_alpaca_20k.json").write_text(json.dumps([{"instruction": "Local?", "output": "Yes."}]))
    (local,) = load_datasets([{"code_alpaca": {"val_split": 0}}], tmp_path)
    assert local.files == [tmp_path / "code_alpaca_20k.json"] and local.train[0][0]["text"] == "Local?"
    with pytest.raises(DataError, match=r"file not found: .*my_code\.json$"):
        load_datasets([{"code_alpaca": {"input_file_path": "my_code.json"}}], tmp_path)


def test_the_seed_mix_trains_from_the_hub_cache_alone(hub, tmp_path, capsys):
    from gptneox.train import main as train_main
    from gptneox.training.distributed import init_distributed

    reference_cache(hub)
    (tmp_path / "empty").mkdir()
    init_distributed()
    out = tmp_path / "run"
    status = train_main(["--configs", "defaults", "tiny", "oasst-mix", "--cache_dir", str(tmp_path / "empty"),
                         "--tokenizer_path", str(SAMPLE / "tokenizer.json"), "--output_dir", str(out),
                         "--max_length", "64", "--per_device_train_batch_size", "2",
                         "--gradient_accumulation_steps", "1", "--num_train_epochs", "1", "--eval_steps", "1000"])
    assert status == 0, capsys.readouterr().err[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    trained = sum(len(d.train) for d in load_datasets(seed_mix(), tmp_path / "empty"))  # sizes: any seed
    assert len(steps) == trained // 2 and all(s["loss"] > 0 for s in steps)


# --- accounting -----------------------------------------------------------------------------------------


def test_a_resume_on_another_snapshot_of_a_hub_dataset_is_a_data_change(hub, tmp_path):
    reference_cache(hub)
    mix = [{"dolly15k": {"val_split": 0.0}}]
    before = dataset_fingerprint(merge_datasets(load_datasets(mix, tmp_path))[0])
    edited = [dict(row, RESPONSE="Blue." if row["RESPONSE"] == "Red." else row["RESPONSE"]) for row in DOLLY_ROWS]
    files = reference_repos(edited)["OllieStanley/oa_dolly_15k"]
    add_snapshot(hub, "OllieStanley/oa_dolly_15k", "e" * 40, files)  # `hf download` again: refs/main moves
    after_train = merge_datasets(load_datasets(mix, tmp_path))[0]
    after = dataset_fingerprint(after_train)
    assert len(after_train) == 3 and after != before
    with pytest.raises(ResumeMismatch, match=f"dataset={before!r}.*dataset={after!r}; pass --allow_changed dataset"):
        check_resume({"dataset": before}, {"dataset": after}, "checkpoint")


def test_the_data_report_lists_the_snapshot_files_it_read(hub, tmp_path, capsys, monkeypatch):
    from gptneox.cli import data_report

    reference_cache(hub)
    status = data_report.main(["--configs", "defaults", "tiny", "oasst-mix", "--cache_dir", str(tmp_path),
                               "--tokenizer_path", str(SAMPLE / "tokenizer.json"), "--json"])
    assert status in (0, None)
    report = json.loads(capsys.readouterr().out)
    rows = {row["dataset"]: row for row in report["datasets"]}
    assert rows["code_alpaca"]["files"] == [str(hub / "datasets--sahil2801--CodeAlpaca-20k" / "snapshots" /
                                                COMMITS["sahil2801/CodeAlpaca-20k"] / "code_alpaca_20k.json")]
    assert rows["code_alpaca"]["drops"] == {"banned word": 1} and rows["oasst_export"]["records"] == 22


def test_a_users_yaml_without_cache_dir_keeps_hf_paths_and_finds_stock_files_in_the_hub(hub, tmp_path):
    from gptneox.data.datasets import load_run_datasets
    from gptneox.training.config import parse_train_config

    reference_cache(hub)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "mix.yaml").write_text(yaml.safe_dump({"mix": {"datasets": [
        {"oasst_export": {"input_file_path": f"hf://datasets/{OASST1}/2023-04-12_oasst_ready.trees.jsonl.gz",
                          "lang": "en,de"}},
        {"code_alpaca": {"input_file_path": "code_alpaca_20k.json"}}]}}))  # taken from mine/, not there
    cfg = parse_train_config(["--configs", "defaults", "tiny", str(mine / "mix.yaml")])
    oasst, code = load_run_datasets(cfg)
    assert cfg.datasets[0]["oasst_export"]["input_file_path"].startswith("hf://datasets/")
    assert oasst.files[0].name == "2023-04-12_oasst_ready.trees.jsonl.gz" and len(oasst.train + oasst.eval) == 5
    assert code.files == [hub / "datasets--sahil2801--CodeAlpaca-20k" / "snapshots" / COMMITS["sahil2801/CodeAlpaca-20k"]
                          / "code_alpaca_20k.json"]
