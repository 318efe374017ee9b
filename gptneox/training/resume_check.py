"""What a resume must match, checked before anything is loaded or written.

Each checkpoint tag carries `run.json`: the settings of the run that wrote it. A resume compares them with
its own before DeepSpeed loads a byte or rank 0 rewrites a file, and refuses a difference in one line naming
both values. Settings that only change the schedule or the data's contents can be changed on purpose with
`--allow_changed NAME,NAME`; those DeepSpeed cannot load across (model shape, world size, ZeRO stage) and
those the data order is cut from (seed, global batch, number of training conversations) cannot.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gptneox.errors import UserError

RUN_RECORD = "run.json"
# DeepSpeed cannot load a checkpoint across these: parameter shapes differ, or ZeRO-2's optimizer partitions
# were cut for another number of ranks (DeepSpeed 0.19 refuses to re-partition a ZeRO-1/2 checkpoint unless it
# was first converted to a universal checkpoint).
# The saved position (epoch, step in epoch) indexes a data order drawn from rng_seed, num_samples and the
# global batch: with any of them changed it points nowhere (TrainState refuses it too, after the load).
# A LoRA checkpoint holds adapters, a full one every weight: neither loads as the other, nor as adapters of
# another rank, targets or token rows.
FIXED = ("model", "lora", "world_size", "zero_stage", "rng_seed", "global_batch_size", "num_samples")
# A change of any of these changes the run's numbers; --allow_changed says it is intended.
WAIVABLE = ("dtype", "learning_rate", "warmup_steps", "total_steps", "num_train_epochs", "max_length", "dataset")


class ResumeMismatch(UserError):
    """This run's settings differ from the checkpoint's; the message names the setting and both values."""


def dataset_fingerprint(conversations: list) -> str:
    """sha256 of the training conversations' contents, in order: the same count with other texts differs."""
    digest = hashlib.sha256()
    for conversation in conversations:
        digest.update(json.dumps(conversation, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def run_record(*, model: dict, dtype: str, world_size: int, zero_stage: int, learning_rate: float,
               warmup_steps: int, total_steps: int, num_train_epochs: float, max_length: int,
               global_batch_size: int, rng_seed: int, train_set: list, lora: dict | None = None) -> dict:
    """The settings a resume must match (`model` is the model's config.json content; `lora` the adapters'
    settings, None for full fine-tuning), as JSON reads them."""
    return json.loads(json.dumps({"model": model_settings(model), "lora": lora, "dtype": dtype,
            "world_size": world_size, "zero_stage": zero_stage, "learning_rate": learning_rate,
            "warmup_steps": warmup_steps, "total_steps": total_steps, "num_train_epochs": num_train_epochs,
            "max_length": max_length, "global_batch_size": global_batch_size, "rng_seed": rng_seed,
            "num_samples": len(train_set), "dataset": dataset_fingerprint(train_set)}))


def model_settings(config_json: dict) -> dict:
    """The parts of a model's config.json that a resume compares (all but the class name)."""
    return json.loads(json.dumps({k: v for k, v in config_json.items() if k != "architectures"}))


def write_run_record(tag_dir: str | Path, record: dict) -> Path:
    path = Path(tag_dir) / RUN_RECORD
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def read_run_record(tag_dir: str | Path) -> dict | None:
    """None for a checkpoint written before run.json existed."""
    path = Path(tag_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ResumeMismatch(f"{path}: unreadable ({err})") from None


def check_resume(saved: dict, current: dict, where: str | Path, allowed: set[str] = frozenset()) -> list[str]:
    """Refuse (ResumeMismatch, one line) the first setting that differs and is not allowed to; return
    notes on the allowed changes, for the log."""
    unknown = sorted(set(allowed) - set(WAIVABLE))
    if unknown:
        fixed = [name for name in unknown if name in FIXED]
        raise ResumeMismatch(f"--allow_changed {', '.join(unknown)}: " + (
            f"{', '.join(fixed)} cannot change across a resume" if fixed else
            f"not a resume check (those are {', '.join(WAIVABLE)})"))
    notes = []
    for name in FIXED + WAIVABLE:
        if name not in saved or saved[name] == current[name]:
            continue
        theirs, ours = _difference(name, saved[name], current[name])
        if name in allowed:
            notes.append(f"resume: {name} changed from {theirs} to {ours} (--allow_changed)")
            continue
        remedy = (f"{name} cannot change across a resume" if name in FIXED else
                  f"pass --allow_changed {name} if that is intended")
        raise ResumeMismatch(f"resume: {where} was written with {theirs}, this run has {ours}; {remedy}")
    return notes


def _difference(name: str, theirs: Any, ours: Any) -> tuple[str, str]:
    """Both sides as short text: for the model, only the fields that differ."""
    if name == "lora":
        return _lora_text(theirs), _lora_text(ours)
    if name == "model":
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        return (", ".join(f"{k}={theirs.get(k)!r}" for k in keys), ", ".join(f"{k}={ours.get(k)!r}" for k in keys))
    return f"{name}={theirs!r}", f"{name}={ours!r}"


def _lora_text(lora: dict | None) -> str:
    if lora is None:
        return "full fine-tuning (lora_r=0)"
    return "LoRA " + ", ".join(f"{key}={value!r}" for key, value in lora.items())
