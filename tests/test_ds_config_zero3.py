"""The ZeRO-3 DeepSpeed config files: "auto" resolved like the seed's file, and the loop's refusal of stage 3."""
from __future__ import annotations

import json

import pytest

from gptneox.training.config import TrainConfig, parse_train_config
from gptneox.training.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config

from conftest import REPO

ZERO3_FILES = ["ds_config_zero3.json", "ds_config_zero3_offload.json"]


@pytest.mark.parametrize("name", ZERO3_FILES)
def test_zero3_files_resolve_stage3_keys_from_the_hidden_size(name):
    cfg = parse_train_config(["--configs", "defaults", "gpt-neox-20b"])
    resolved, _ = resolve_ds_config(load_ds_config(REPO / name), cfg, world_size=8, hidden_size=6144,
                                    total_num_steps=100, cpu=False, for_training=False)
    zero = resolved["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["reduce_bucket_size"] == 6144 ** 2                       # as the HF Trainer fills them
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 6144 ** 2)
    assert zero["stage3_param_persistence_threshold"] == 10 * 6144
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert resolved["train_batch_size"] == 4 * 2 * 8
    assert "auto" not in json.dumps(resolved)
    # everything outside zero_optimization is the seed's file
    seed = load_ds_config(REPO / "ds_config.json")
    template = load_ds_config(REPO / name)
    assert {k: v for k, v in template.items() if k != "zero_optimization"} == \
           {k: v for k, v in seed.items() if k != "zero_optimization"}
    assert ("offload_optimizer" in zero) == name.endswith("offload.json")


def test_the_training_loop_refuses_stage3_in_one_line():
    with pytest.raises(DeepSpeedConfigError, match="stage=3: the training loop does not support ZeRO-3"):
        resolve_ds_config(load_ds_config(REPO / "ds_config_zero3.json"), TrainConfig(), world_size=1,
                          hidden_size=64, total_num_steps=10, cpu=True)


def test_seed_file_is_unchanged_by_the_stage3_keys():
    resolved, _ = resolve_ds_config(load_ds_config(REPO / "ds_config.json"), TrainConfig(), world_size=1,
                                    hidden_size=64, total_num_steps=10, cpu=True)
    assert "stage3_prefetch_bucket_size" not in resolved["zero_optimization"]
