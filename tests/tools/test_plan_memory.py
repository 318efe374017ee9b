"""gptneox-plan-memory takes train.py's --configs (the model, max_length, micro-batch and dtype of the run), fits
100 columns, and prints JSON with --json."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptneox.cli.plan_memory import main as plan_memory_main

from tests.helpers import LAUNCH_VARIABLES, REPO, run_main

SFT7 = ["--gpus", "8", "--gpu_memory_gb", "80", "--configs", "defaults", "stablelm-7b", "oasst-mix"]


def plan(*argv, plain_cpu: bool = False):
    """tools/plan_memory.py ARGV: in this process (it only reads configs, computes and prints), or, with
    plain_cpu, in a fresh interpreter without DS_ACCELERATOR."""
    if plain_cpu:  # a CPU machine as users have it: DeepSpeed finds no accelerator and would say so on stdout
        environment = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARIABLES, "DS_ACCELERATOR")}
        return subprocess.run([sys.executable, str(REPO / "tools/plan_memory.py"), *argv], cwd=REPO, env=environment,
                              capture_output=True, text=True, timeout=300)
    return run_main(plan_memory_main, "plan_memory.py", *argv)


def test_the_sft7_configs_need_no_flag_the_config_holds_and_the_table_fits_100_columns():
    done = plan(*SFT7)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert "micro-batch 4 x 4096 tokens, fp16" in " ".join(lines)  # stablelm-7b's per_device_train_batch_size, max_length
    assert "ds_config: fits with gradient checkpointing only" in lines


@pytest.mark.slow
def test_json_holds_the_figures_of_the_explicit_flags(tmp_path):
    from_configs = json.loads(plan(*SFT7, "--json", plain_cpu=True).stdout)
    explicit = plan("--model", "stablelm-7b", "--gpus", "8", "--gpu_memory_gb", "80", "--max_length", "4096",
                    "--micro_batch", "4", "--json")
    assert explicit.returncode == 0, explicit.stderr
    explicit = json.loads(explicit.stdout)
    assert [p["peak_gb"] for p in from_configs["plans"]] == [p["peak_gb"] for p in explicit["plans"]]
    assert [p["deepspeed_config"] for p in explicit["plans"]] == ["ds_config", "ds_config_zero3",
                                                                   "ds_config_zero3_offload"]
    zero2 = explicit["plans"][0]
    assert zero2["fits"] == {"with_checkpointing": True, "without_checkpointing": False}
    # the peak is the states plus the larger of the activations and the optimizer step's extra
    peak = sum(zero2["gpu_gb"].values()) + max(sum(explicit["activations_gb"]["with_checkpointing"].values()),
                                               sum(zero2["gpu_at_optimizer_step_gb"].values()))
    assert abs(zero2["peak_gb"]["with_checkpointing"] - peak) < 0.01


def test_flags_and_train_keys_override_the_configs():
    done = plan(*SFT7, "--max_length", "2048", "--per_device_train_batch_size", "2", "--dtype", "bf16", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert (figures["max_length"], figures["micro_batch"], figures["dtype"]) == (2048, 2, "bf16")


def test_without_configs_the_model_and_batch_are_required_and_train_keys_are_refused():
    done = plan("--gpus", "8", "--gpu_memory_gb", "80")
    assert done.returncode == 2 and "without --configs, --model, --max_length and --micro_batch are required" in done.stderr
    done = plan("--model", "tiny", "--gpus", "1", "--gpu_memory_gb", "8", "--max_length", "64", "--micro_batch", "1",
                "--cache_dir", "DATA")
    assert done.returncode == 2 and "train.py's keys need --configs" in done.stderr


def test_a_lora_section_in_configs_plans_lora_and_flags_still_win():
    """configs/lora.yaml: r 16 on all-linear, dropout 0.05, the chat-token rows trained."""
    lora = json.loads(plan(*SFT7, "lora", "--json").stdout)["lora"]
    assert lora["r"] == 16 and lora["dropout"] == 0.05
    assert lora["target_modules"] == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    flagged = json.loads(plan(*SFT7, "lora", "--lora_r", "4", "--lora_target_modules", "dense", "--json").stdout)
    assert flagged["lora"]["r"] == 4 and flagged["lora"]["target_modules"] == ["dense"]
    assert json.loads(plan(*SFT7, "--json").stdout)["lora"] is None  # no lora section: full fine-tuning
