"""Resolve the seed's `ds_config.json` ("auto" values and all) the way the Hugging Face Trainer did.

DeepSpeed has no notion of "auto": top-level "auto" values crash late with a TypeError and pydantic
sub-configs silently drop them (`"fp16": {"enabled": "auto"}` would mean fp16 *off*). So every "auto" is
filled here from the training config, a value that disagrees with the training config is an error, and
nothing reaches `deepspeed.initialize` unresolved. The tables are those of transformers'
`HfTrainerDeepSpeedConfig` (reference/deepspeed.md section 1).
"""
from __future__ import annotations

import copy
import inspect
import json
import math
from pathlib import Path
from typing import Any

from deepspeed.runtime import lr_schedules

from gptneox.errors import UserError
from gptneox.training.config import TrainConfig

# The DeepSpeed schedulers whose rates come from the training config (learning_rate as the peak,
# warmup_steps, the run's length). OneCycle and LRRangeTest take rates of their own (OneCycle also cycles
# Adam's beta1), so learning_rate and warmup_steps would be silently ignored: they are refused.
SCHEDULERS = ("WarmupDecayLR", "WarmupLR", "WarmupCosineLR")


class DeepSpeedConfigError(UserError, ValueError):
    """An unresolved or contradictory ds_config value; the message names the key and both values."""


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"deepspeed_config {path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}: invalid JSON ({err})") from None


def resolve_ds_config(template: dict, cfg: TrainConfig, *, world_size: int, hidden_size: int,
                      total_num_steps: int, cpu: bool) -> tuple[dict, list[str]]:
    """The config to hand to deepspeed.initialize, plus human-readable notes on what was added.

    `template` is not modified. Keys marked "fill" below are only filled where "auto", never compared:
    they are not training-config values (HF's `fill_only`).
    """
    resolved = copy.deepcopy(template)
    dropped = _drop_auto_params_not_taken(resolved.get("scheduler"))
    micro, gas = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    # The loop's batch layout must be DeepSpeed's: with a smaller GAS in the config ZeRO-2 would keep only
    # the last micro-batch's gradients. So these are set even when the template leaves them out.
    required = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    if_present = {
        "optimizer.params.lr": cfg.learning_rate,
        "optimizer.params.betas": [cfg.adam_beta1, cfg.adam_beta2],
        "optimizer.params.eps": cfg.adam_epsilon,
        "optimizer.params.weight_decay": cfg.weight_decay,
        "scheduler.params.warmup_max_lr": cfg.learning_rate,
        "scheduler.params.warmup_num_steps": cfg.warmup_steps,
        "scheduler.params.total_num_steps": total_num_steps,
        "fp16.enabled": cfg.dtype == "fp16",
        "bf16.enabled": cfg.dtype == "bf16",
    }
    fill = {
        "scheduler.params.warmup_min_lr": 0,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        # ZeRO-3 only (HF's trainer_config_finalize): gather ahead ~one matrix, keep vectors unpartitioned
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in required.items():
        _set(resolved, key, value, create=True)
    for key, value in if_present.items():
        _set(resolved, key, value, create=False)
    for key, value in fill.items():
        _set(resolved, key, value, create=False, compare=False)

    leftover = [key for key, value in _walk(resolved) if value == "auto"]
    if leftover:
        raise DeepSpeedConfigError(f"ds_config keys still 'auto' after resolution: {', '.join(leftover)}")
    if resolved.get("fp16", {}).get("enabled") and resolved.get("bf16", {}).get("enabled"):
        raise DeepSpeedConfigError("ds_config enables both fp16 and bf16")
    if "optimizer" not in resolved:
        raise DeepSpeedConfigError("ds_config has no 'optimizer' section; the loop takes AdamW from it")

    _check_scheduler(resolved.get("scheduler"), cfg)

    notes = []
    if dropped:
        notes.append(f"scheduler {resolved['scheduler']['type']} takes no {', '.join(dropped)}: those 'auto' "
                     "values left out")
    optimizer = resolved["optimizer"]
    if cpu and optimizer.get("type", "").lower() in ("adam", "adamw"):
        params = optimizer.setdefault("params", {})
        if "torch_adam" not in params:
            params["torch_adam"] = True
            notes.append("CPU accelerator: optimizer.params.torch_adam=true (torch.optim.AdamW instead of "
                         "DeepSpeed's FusedAdam, whose C++ build takes about two minutes on CPU)")
        if params["torch_adam"] and "fused" not in params and "foreach" not in params:
            # torch's fused CPU kernel makes one pass over each flat ZeRO partition instead of one per
            # elementwise op: 8x faster on 70M parameters (docs/benchmarks.md); DeepSpeed passes it through
            params["fused"] = True
            notes.append("CPU accelerator: optimizer.params.fused=true (torch's fused AdamW kernel)")
    scheduler = resolved.get("scheduler", {})
    if scheduler.get("type") in SCHEDULERS and "warmup_type" not in scheduler.get("params", {}):
        notes.append("scheduler warmup_type unset: DeepSpeed's default, logarithmic warmup (as in the seed run)")
    return resolved, notes


def check_scheduler(cfg: TrainConfig) -> None:
    """The scheduler checks before any data or weights are read (gptneox.train calls this first), on the
    config file's scheduler section as resolve_ds_config will see it."""
    scheduler = load_ds_config(cfg.deepspeed_config).get("scheduler")
    _drop_auto_params_not_taken(scheduler)
    _check_scheduler(scheduler, cfg)


def _scheduler_parameters(kind: str) -> set[str]:
    return set(inspect.signature(getattr(lr_schedules, kind)).parameters) - {"optimizer", "last_batch_iteration"}


def _drop_auto_params_not_taken(scheduler: dict | None) -> list[str]:
    """Remove (in place) the "auto" parameters a supported scheduler does not take, and return their names:
    a copy of the seed's file with only scheduler.type changed (WarmupLR takes no total_num_steps,
    WarmupCosineLR no warmup_min_lr/warmup_max_lr) then works. A value the user set is never dropped."""
    if not scheduler or scheduler.get("type") not in SCHEDULERS:
        return []
    params = scheduler.get("params", {})
    dropped = [name for name, value in params.items()
               if value == "auto" and name not in _scheduler_parameters(scheduler["type"])]
    for name in dropped:
        del params[name]
    return dropped


def _check_scheduler(scheduler: dict | None, cfg: TrainConfig) -> None:
    """At start, not at deepspeed.initialize after the model is loaded: a scheduler the loop cannot drive
    from the training config, a parameter its DeepSpeed class does not take, a warmup it cannot do."""
    if scheduler is None:
        if cfg.warmup_steps:
            raise DeepSpeedConfigError(f"ds_config has no 'scheduler' section, so warmup_steps={cfg.warmup_steps} "
                                       "would be ignored (constant learning rate); add one (type "
                                       f"{' / '.join(SCHEDULERS)}) or set warmup_steps 0")
        return
    kind = scheduler.get("type")
    if kind not in SCHEDULERS:
        raise DeepSpeedConfigError(f"ds_config scheduler.type={kind!r} is not supported: its learning rates would "
                                   "not follow learning_rate and warmup_steps; use one of " + ", ".join(SCHEDULERS))
    params = scheduler.get("params", {})
    accepted = _scheduler_parameters(kind)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise DeepSpeedConfigError(f"ds_config scheduler.params {', '.join(unknown)}: not parameters of {kind} "
                                   f"(it takes {', '.join(sorted(accepted))})")
    warmup = params.get("warmup_num_steps", 1)
    if warmup == "auto":  # as resolve_ds_config fills it (a number it would refuse if it differed)
        warmup = cfg.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise DeepSpeedConfigError(f"ds_config scheduler.params.warmup_num_steps={warmup!r} (warmup_steps): "
                                   f"DeepSpeed's {kind} needs a positive integer (set warmup_steps 1 or more, "
                                   "or remove the scheduler section for a constant learning rate)")


def _set(config: dict, dotted: str, value: Any, *, create: bool, compare: bool = True) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if part not in node:
            if not create:
                return
            node[part] = {}
        node = node[part]
    if leaf not in node:
        if create:
            node[leaf] = value
        return
    current = node[leaf]
    if current == "auto":
        node[leaf] = value
    elif compare and not _same(current, value):
        raise DeepSpeedConfigError(f"ds_config {dotted}={current!r} contradicts the training config, "
                                   f"which gives {value!r}; set it to \"auto\" or make them agree")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.") if isinstance(value, (dict, list)) else [(prefix + key, value)]
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}{index}.") if isinstance(value, (dict, list)) else [(f"{prefix}{index}", value)]
