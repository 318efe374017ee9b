"""ds_config.json "auto" values resolved from the training config, as the Hugging Face Trainer did."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptneox.training.config import TrainConfig, parse_train_config
from gptneox.training.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config

REPO = Path(__file__).resolve().parents[2]


def _resolve(cfg: TrainConfig, template: dict | None = None, **kwargs):
    template = template or load_ds_config(REPO / "ds_config.json")
    args = dict(world_size=4, hidden_size=6144, total_num_steps=1234, cpu=False) | kwargs
    return resolve_ds_config(template, cfg, **args)


def test_seed_ds_config_resolves_like_the_hf_trainer():
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b"])
    original = load_ds_config(REPO / "ds_config.json")
    resolved, notes = _resolve(cfg, original)
    assert resolved["train_micro_batch_size_per_gpu"] == 4 and resolved["gradient_accumulation_steps"] == 2
    assert resolved["train_batch_size"] == 4 * 2 * 4 and resolved["gradient_clipping"] == 2.0
    assert resolved["optimizer"]["params"] == {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-12, "weight_decay": 0.0}
    assert resolved["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 1e-5, "warmup_num_steps": 100,
                                               "total_num_steps": 1234}
    assert resolved["fp16"]["enabled"] is True and resolved["bf16"]["enabled"] is False
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 1e9  # not "auto" in the seed: kept
    assert "auto" not in json.dumps(resolved)
    assert original["train_batch_size"] == "auto"  # the template is not modified
    assert any("logarithmic warmup" in n for n in notes)


def test_cpu_gets_torch_adam_and_an_auto_bucket_gets_hidden_squared():
    template = load_ds_config(REPO / "ds_config.json")
    template["zero_optimization"]["reduce_bucket_size"] = "auto"
    resolved, notes = _resolve(TrainConfig(dtype="bf16"), template, cpu=True, hidden_size=64)
    assert resolved["optimizer"]["params"]["torch_adam"] is True and any("torch_adam" in n for n in notes)
    assert resolved["optimizer"]["params"]["fused"] is True
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False


def test_contradicting_value_names_key_and_both_values():
    template = load_ds_config(REPO / "ds_config.json")
    template["optimizer"]["params"]["lr"] = 3e-4
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer.params.lr=0.0003 .* gives 1e-05"):
        _resolve(TrainConfig(), template)
    template = load_ds_config(REPO / "ds_config.json")
    template["gradient_accumulation_steps"] = 1
    with pytest.raises(DeepSpeedConfigError, match=r"gradient_accumulation_steps=1 .* gives 32"):
        _resolve(TrainConfig(), template)


def test_an_auto_nobody_fills_is_refused():
    template = load_ds_config(REPO / "ds_config.json")
    template["zero_optimization"]["allgather_bucket_size"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.allgather_bucket_size"):
        _resolve(TrainConfig(), template)


def test_a_chosen_torch_adam_implementation_is_kept():
    template = load_ds_config(REPO / "ds_config.json")
    template["optimizer"]["params"]["foreach"] = True
    resolved, notes = _resolve(TrainConfig(dtype="bf16"), template, cpu=True)
    assert "fused" not in resolved["optimizer"]["params"] and not any("fused" in n for n in notes)
    resolved, _ = _resolve(TrainConfig(dtype="bf16"), cpu=False)
    assert "fused" not in resolved["optimizer"]["params"]  # GPU: DeepSpeed's FusedAdam


# ------------------------------------------------------------------ ZeRO-3 files
ZERO3_FILES = ["ds_config_zero3.json", "ds_config_zero3_offload.json"]


@pytest.mark.parametrize("name", ZERO3_FILES)
def test_zero3_files_resolve_stage3_keys_from_the_hidden_size(name):
    cfg = parse_train_config(["--configs", "defaults", "gpt-neox-20b"])
    resolved, _ = resolve_ds_config(load_ds_config(REPO / name), cfg, world_size=8, hidden_size=6144,
                                    total_num_steps=100, cpu=False)
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


def test_seed_file_is_unchanged_by_the_stage3_keys():
    resolved, _ = resolve_ds_config(load_ds_config(REPO / "ds_config.json"), TrainConfig(), world_size=1,
                                    hidden_size=64, total_num_steps=10, cpu=True)
    assert "stage3_prefetch_bucket_size" not in resolved["zero_optimization"]


@pytest.mark.parametrize("kind, params, last_lr", [
    ("WarmupDecayLR", {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                       "total_num_steps": "auto"}, 0.0),
    ("WarmupLR", {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                  "warmup_type": "linear"}, 1e-3),
    ("WarmupCosineLR", {"warmup_num_steps": "auto", "total_num_steps": "auto", "cos_min_ratio": 0.0}, 0.0),
])
def test_supported_schedulers_follow_the_training_config(kind, params, last_lr):
    """Each scheduler DeepSpeed builds from the resolved params peaks at learning_rate after warmup_steps."""
    from deepspeed.runtime import lr_schedules
    template = load_ds_config(REPO / "ds_config.json")
    template["scheduler"] = {"type": kind, "params": params}
    resolved, _ = _resolve(TrainConfig(learning_rate=1e-3, warmup_steps=4), template, total_num_steps=10)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=resolved["optimizer"]["params"]["lr"])
    scheduler = getattr(lr_schedules, kind)(optimizer, **resolved["scheduler"]["params"])
    rates = []
    for _ in range(11):  # as the engine does: one scheduler step after each optimizer step
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert max(rates) == pytest.approx(1e-3) and rates[0] < 1e-3
    assert rates.index(max(rates)) <= 4  # the peak comes within warmup_steps
    assert rates[-1] == pytest.approx(last_lr, abs=1e-9)  # decayed to zero at total_num_steps, or kept


@pytest.mark.parametrize("kind, left_out", [("WarmupLR", "total_num_steps"),
                                             ("WarmupCosineLR", "warmup_min_lr, warmup_max_lr")])
def test_a_copy_of_the_seed_file_with_only_the_scheduler_type_changed_works(kind, left_out):
    """What the README and the --lr_scheduler_type pointer tell a user to do: the seed's 'auto' parameters the
    other scheduler does not take are left out (said in a note), the rest filled, and DeepSpeed builds it."""
    from deepspeed.runtime import lr_schedules
    template = load_ds_config(REPO / "ds_config.json")
    template["scheduler"]["type"] = kind
    resolved, notes = _resolve(TrainConfig(learning_rate=1e-3, warmup_steps=4), template, total_num_steps=10)
    assert f"scheduler {kind} takes no {left_out}: those 'auto' values left out" in notes
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    getattr(lr_schedules, kind)(optimizer, **resolved["scheduler"]["params"])
    assert resolved["scheduler"]["params"]["warmup_num_steps"] == 4
    template["scheduler"]["params"]["warmup_max_lr"] = 1e-4  # a value the user set is never left out
    if kind == "WarmupCosineLR":
        with pytest.raises(DeepSpeedConfigError, match="warmup_max_lr: not parameters of WarmupCosineLR"):
            _resolve(TrainConfig(learning_rate=1e-4, warmup_steps=4), template, total_num_steps=10)


@pytest.mark.parametrize("scheduler, message", [
    ({"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1e-5}},
     "scheduler.type='OneCycle' is not supported: .* use one of WarmupDecayLR, WarmupLR, WarmupCosineLR"),
    ({"type": "LRRangeTest", "params": {}}, "scheduler.type='LRRangeTest' is not supported"),
    ({"type": "StepLR", "params": {"step_size": 10}}, "scheduler.type='StepLR' is not supported"),
    ({"type": "WarmupCosineLR", "params": {"warmup_max_lr": 1e-5, "total_num_steps": "auto"}},
     r"scheduler.params warmup_max_lr: not parameters of WarmupCosineLR \(it takes cos_min_ratio, "),
    ({"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}, "warmup_num_steps=0 .*needs a positive integer"),
    (None, "no 'scheduler' section, so warmup_steps=600 would be ignored"),
])
def test_schedulers_the_loop_cannot_drive_are_refused_at_start(scheduler, message):
    template = load_ds_config(REPO / "ds_config.json")
    template.pop("scheduler")
    if scheduler is not None:
        template["scheduler"] = scheduler
    with pytest.raises(DeepSpeedConfigError, match=message):
        _resolve(TrainConfig(warmup_steps=0 if "=0" in message else 600), template)
    if scheduler is None:  # without warmup, no scheduler is a constant learning rate, as asked
        assert "scheduler" not in _resolve(TrainConfig(warmup_steps=0), template)[0]
