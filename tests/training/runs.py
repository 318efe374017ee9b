"""What the training tests share: the bundled sample data as a mix, and a tiny run of train.py in this process
(run_train) or as a script under the launcher (script_argv), over the `workspace` fixture (conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

from gptneox.train import main as train_main

from tests.helpers import REPO

SAMPLE = REPO / "data" / "sample"
SAMPLE_DATASETS = [
    {"code_alpaca": {"input_file_path": str(SAMPLE / "code_alpaca_sample.jsonl"), "val_split": 0.2}},
    {"grade_school_math_instructions": {"input_file_path": str(SAMPLE / "gsm_sample.csv"), "val_split": 0.2}},
    {"vicuna": {"input_file_path": str(SAMPLE / "vicuna_sample.json"), "val_split": 0.2}},
    {"oasst_export": {"input_file_path": str(SAMPLE / "oasst_sample.jsonl.gz"), "lang": "en,de"}},
]


def run_train(workspace, output_dir, *extra) -> int:
    root, tokenizer = workspace
    argv = ["--configs", "defaults", "tiny", str(root / "mix.yaml"), "--tokenizer_path", str(tokenizer),
            "--output_dir", str(output_dir), "--max_length", "64", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--eval_size", "4", *extra]
    return train_main(argv)


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def script_argv(workspace, output_dir, *extra) -> list[str]:
    root, tokenizer = workspace
    return ["train.py", "--configs", "defaults", "tiny", str(root / "mix.yaml"), "--tokenizer_path", str(tokenizer),
            "--output_dir", str(output_dir), "--max_length", "64", "--eval_size", "4", *extra]
