"""What a resume must match, checked before anything is loaded or written.

Each checkpoint tag carries `run.json`: the settings of the run that wrote it. A resume compares them with
its own before DeepSpeed loads a byte or rank 0 rewrites a file, and refuses every difference at once in
one line naming both values. Settings that only change the schedule or the data's contents can be changed
on purpose with `--allow_changed NAME,NAME` (the refusal gives the exact value); those DeepSpeed cannot
load across (model shape, world size, ZeRO stage), those the data order is cut from (seed, global batch,
number of training conversations) and the tokenizer the weights' rows belong to cannot.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gptneox.errors import UserError

RUN_RECORD = "run.json"
# DeepSpeed cannot load a checkpoint across these: parameter shapes differ, or ZeRO-2's optimizer partitions
# were cut for another number of ranks (DeepSpeed 0.19 refuses to re-partition a ZeRO-1/2 checkpoint unless it
# was first converted to a universal checkpoint).
# The saved position (epoch, step in epoch) indexes a data order drawn from rng_seed, num_samples and the
# global batch: with any of them changed it points nowhere (TrainState refuses it too, after the load).
# Each embedding row was trained for one token id: another tokenizer (same size, other ids) pairs the
# weights with the wrong tokens. A LoRA checkpoint holds adapters, a full one every weight: neither loads as
# the other, nor as adapters of another rank, targets or token rows.
FIXED = ("model", "lora", "tokenizer", "world_size", "zero_stage", "rng_seed", "global_batch_size", "num_samples")
# A change of any of these changes the run's numbers; --allow_changed says it is intended. base_weights is
# a LoRA run's frozen base (gptneox.weights.weights_fingerprint; None for full fine-tuning, whose checkpoint
# holds every weight): the adapters were trained against it, and are resumed onto whatever base is given.
WAIVABLE = ("dtype", "learning_rate", "warmup_steps", "total_steps", "num_train_epochs", "max_length", "dataset",
            "base_weights")


class ResumeMismatch(UserError):
    """This run's settings differ from the checkpoint's; the message names every setting and both values."""


def dataset_fingerprint(conversations: list) -> str:
    """sha256 of the training conversations' contents, in order: the same count with other texts differs."""
    digest = hashlib.sha256()
    for conversation in conversations:
        digest.update(json.dumps(conversation, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the vocabulary (every token with its id, added ones included) and of which tokens are
    special: the same size with other ids differs."""
    vocabulary = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    special = sorted(token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special)
    text = json.dumps({"vocab": vocabulary, "special": special}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_record(*, model: dict, train_set: list, **settings: Any) -> dict:
    """The settings a resume must match, as JSON reads them: `model` is the model's config.json content,
    `train_set` the training conversations (their count and fingerprint are compared), `settings` every
    other name of FIXED and WAIVABLE (tokenizer: tokenizer_fingerprint)."""
    record = {"model": model_settings(model), "num_samples": len(train_set),
              "dataset": dataset_fingerprint(train_set), **settings}
    missing, unknown = set(FIXED + WAIVABLE) - set(record), set(record) - set(FIXED + WAIVABLE)
    if missing or unknown:
        raise TypeError(f"run_record: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return json.loads(json.dumps(record))


def model_settings(config_json: dict) -> dict:
    """The parts of a model's config.json that a resume compares (all but the class name)."""
    return json.loads(json.dumps({k: v for k, v in config_json.items() if k != "architectures"}))


def write_run_record(tag_dir: str | Path, record: dict) -> Path:
    path = Path(tag_dir) / RUN_RECORD
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def read_run_record(tag_dir: str | Path) -> dict | None:
    """None for a checkpoint written before run.json existed. A record that is not what write_run_record
    writes (not JSON, not an object, or a model, lora or file list of another type: tampered with) is
    unreadable, as one line naming the file: its callers read those fields as objects."""
    path = Path(tag_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResumeMismatch(f"{path}: unreadable ({err})") from None
    if not isinstance(record, dict):
        kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(type(record), "null")
        raise ResumeMismatch(f"{path}: unreadable (a JSON {kind}, not an object)")
    for key, types in (("model", (dict,)), ("lora", (dict, type(None))), ("files", (dict, type(None)))):
        if key in record and not isinstance(record[key], types):
            raise ResumeMismatch(f"{path}: unreadable ('{key}' is {record[key]!r})")
    files = record.get("files") or {}
    if not all(isinstance(size, int) and not isinstance(size, bool) for size in files.values()):
        raise ResumeMismatch(f"{path}: unreadable ('files' is {files!r}, not file sizes)")
    return record


def check_resume(saved: dict, current: dict, where: str | Path, allowed: set[str] = frozenset(),
                 sources: dict[str, tuple[str, str]] | None = None) -> list[str]:
    """Refuse (ResumeMismatch, one line) every setting that differs and is not allowed to, all at once,
    with the `--allow_changed` value that accepts the changeable ones; return notes on the allowed
    changes, for the log. `sources` names where a setting's two values came from (the checkpoint's and this
    run's tokenizer files, say), for the message."""
    unknown = sorted(set(allowed) - set(WAIVABLE))
    if unknown:
        fixed = [name for name in unknown if name in FIXED]
        raise ResumeMismatch(f"--allow_changed {', '.join(unknown)}: " + (
            f"{', '.join(fixed)} cannot change across a resume" if fixed else
            f"not a resume check (those are {', '.join(WAIVABLE)})"))
    differing = [name for name in FIXED + WAIVABLE if name in saved and saved[name] != current[name] and not
                 (name == "base_weights" and None in (saved[name], current[name]))]  # not LoRA both: `lora` says it
    fixed = [name for name in differing if name in FIXED]
    waivable = [name for name in differing if name in WAIVABLE]
    if fixed or set(waivable) - set(allowed):
        pairs = [_difference(name, saved[name], current[name], (sources or {}).get(name)) for name in differing]
        remedies = []
        if fixed:
            remedies.append(f"{', '.join(fixed)} cannot change across a resume")
        if waivable:
            value = ",".join(waivable)
            remedies.append(f"pass --allow_changed {value} if that is intended" if not fixed else
                            f"--allow_changed {value} would accept the other{'s' if len(waivable) > 1 else ''}")
        raise ResumeMismatch(f"resume: {where} was written with {', '.join(theirs for theirs, _ in pairs)}, "
                             f"this run has {', '.join(ours for _, ours in pairs)}; {'; '.join(remedies)}")
    return [f"resume: {name} changed from {theirs} to {ours} (--allow_changed)"
            for name in waivable for theirs, ours in [_difference(name, saved[name], current[name])]]


def _difference(name: str, theirs: Any, ours: Any, sources: tuple[str, str] | None = None) -> tuple[str, str]:
    """Both sides as short text: for the model, only the fields that differ; each side followed by where it
    came from, given `sources`."""
    if name == "lora":
        return _lora_text(theirs, ours), _lora_text(ours, theirs)
    if name == "model":
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        return (", ".join(f"{k}={theirs.get(k)!r}" for k in keys), ", ".join(f"{k}={ours.get(k)!r}" for k in keys))
    if sources:
        return f"{name}={theirs!r} ({sources[0]})", f"{name}={ours!r} ({sources[1]})"
    return f"{name}={theirs!r}", f"{name}={ours!r}"


def _lora_text(lora: dict | None, other: dict | None) -> str:
    """One side of a LoRA difference: against other LoRA settings, only the ones that differ."""
    if lora is None:
        return "full fine-tuning (lora_r=0)"
    keys = [key for key in ("r", "alpha", "dropout", "target_modules", "token_ids")
            if other is None or lora.get(key) != other.get(key)]
    return "LoRA " + ", ".join(f"{key}={lora.get(key)!r}" for key in keys)
