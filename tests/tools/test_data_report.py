"""tools/data_report.py (and padding_report) read a config's data exactly as train.py does."""
from __future__ import annotations

import json

import pytest

from gptneox.cli.data_report import main as data_report_main
from gptneox.data.datasets import load_run_datasets, merge_datasets
from gptneox.training.config import parse_train_config

from tests.data.test_real_layouts import stock_cache
from tests.helpers import REPO, run_main, run_python

SAMPLE_RUN = ["--configs", "defaults", "tiny", "sample-mix"]


def data_report(*argv):
    """tools/data_report.py ARGV in this process (it reads and counts, as the first test checks in a fresh one)."""
    return run_main(data_report_main, "data_report.py", *argv)


def run_training_count(argv):
    return len(merge_datasets(load_run_datasets(parse_train_config(argv)))[0])


@pytest.mark.slow
def test_data_report_prints_the_sample_mix_table_with_the_runs_counts():
    done = run_python("tools/data_report.py", *SAMPLE_RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    count = run_training_count(SAMPLE_RUN)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| dataset | records | train | eval | tokens | trained | p50 | p90 | p99 | max | >256 |")
    total = next(line for line in lines if line.startswith("| all |")).split(" | ")
    assert int(total[2]) == count
    assert "code_alpaca: dropped banned word 1" in done.stdout
    assert f"{count} training conversations; {count // 8} steps per epoch of 8" in done.stdout
    assert "oasst_export: 79 records read from" in done.stderr  # the datasets' own log lines

    padding = run_python("tools/padding_report.py", "--max_length", "128")
    assert padding.returncode == 0 and padding.stdout.startswith(f"{count} training conversations"), padding.stderr


def test_data_report_json_matches_the_loaded_datasets_and_counts_tokens():
    done = data_report(*SAMPLE_RUN, "--max_length", "64", "--world_size", "2", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    datasets = load_run_datasets(parse_train_config(SAMPLE_RUN))
    assert [(r["dataset"], r["train"], r["eval"], r["records"]) for r in report["datasets"]] == \
           [(d.name, len(d.train), len(d.eval), d.records) for d in datasets]
    total = report["total"]
    assert total["train"] == sum(len(d.train) for d in datasets)
    assert 0 < total["trained_tokens"] < total["tokens"] and total["p50"] <= total["p90"] <= total["max"]
    assert 0 < total["longer_than_max_length"] < 1  # at max_length 64 some sample conversations are longer
    assert report["schedule"]["global_batch_size"] == 16 and report["schedule"]["steps_per_epoch"] == total["train"] // 16


def test_data_report_on_the_stock_oasst_mix_in_real_layouts(tmp_path):
    cache = stock_cache(tmp_path)
    done = data_report("--configs", "defaults", "tiny", "oasst-mix", "--cache_dir", cache,
                       "--tokenizer_path", REPO / "data" / "sample" / "tokenizer.json",
                       "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vicuna: dropped empty 1, no assistant reply 1, not starting with a human turn 1" in done.stdout


def test_data_report_bad_config_is_one_line(tmp_path):
    done = data_report(*SAMPLE_RUN, "--cache_dir", tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "data_report.py: error: dataset 'oasst_export': file not found" in done.stderr


def test_a_world_size_of_zero_is_refused_naming_the_flag():
    result = data_report(*SAMPLE_RUN, "--world_size", "0")
    assert result.returncode == 2 and "argument --world_size: '0' must be above 0" in result.stderr, result.stderr
