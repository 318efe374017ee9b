"""Build the training mix and the per-dataset evaluation sets from a datasets config.

A config is a list like the reference's ``oasst-mix``::

    - oasst_export: {lang: "en,de", input_file_path: trees.jsonl.gz, top_k: 2}
    - vicuna: {val_split: 0.05, max_val_set: 800}

Options every dataset takes:
  ``input_file_path`` (relative to ``cache_dir``; a per-dataset default file name otherwise),
  ``val_split`` (default 0.2, the reference's), ``max_val_set`` (evaluation set capped by sampling
  without replacement), ``fraction`` (keep this share of the training conversations, sampled once here;
  the reference applied it only with its custom sampler), ``skip_bad_records`` (count and log bad
  records instead of stopping).

All randomness is seeded by ``seed`` and the dataset name, so the same config gives the same split in
every process. The split is over *units* (whole message trees for oasst_export), so no tree has
threads on both sides.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gptneox.data.formatting import Conversation
from gptneox.data.readers import BadRecords, DataError, read_records
from gptneox.data.sources import SOURCES, RecordError

log = logging.getLogger(__name__)

COMMON_OPTIONS = ("input_file_path", "val_split", "max_val_set", "fraction", "skip_bad_records")
DEFAULT_VAL_SPLIT = 0.2


def build_datasets(
    datasets_config: list[Any], cache_dir: str | Path = ".", seed: int = 0
) -> tuple[list[Conversation], dict[str, list[Conversation]]]:
    """Return ``(train_conversations, {dataset_name: eval_conversations})``.

    Training conversations are concatenated in config order; a dataset with no evaluation
    conversations (``val_split: 0``) has no entry in the dict.
    """
    if not isinstance(datasets_config, list):
        raise DataError(
            f"datasets config must be a list of {{dataset_name: options}}, got {type(datasets_config).__name__}"
        )
    entries = [parse_entry(entry) for entry in datasets_config]
    names = [name for name, _ in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"dataset(s) {', '.join(repeated)} listed more than once in the datasets config")
    train: list[Conversation] = []
    evals: dict[str, list[Conversation]] = {}
    for name, options in entries:
        dataset_train, dataset_eval = load_dataset(name, options, cache_dir, seed)
        train.extend(dataset_train)
        if dataset_eval:
            evals[name] = dataset_eval
    return train, evals


def parse_entry(entry: Any) -> tuple[str, dict[str, Any]]:
    """``name`` or ``{name: options}`` (options may be empty/null) -> (name, options)."""
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        options = options or {}
    else:
        raise DataError(f"datasets config entry {entry!r} is not a dataset name or a one-key {{name: options}} mapping")
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(SOURCES)}")
    if not isinstance(options, dict):
        raise DataError(f"options of dataset {name!r} must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(COMMON_OPTIONS) - set(SOURCES[name].options))
    if unknown:
        allowed = ", ".join(COMMON_OPTIONS + SOURCES[name].options)
        raise DataError(f"dataset {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {allowed}")
    return name, options


def _number(name: str, options: dict, key: str, default: Any, low: float, high: float, kind: type = float) -> Any:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        expected = "an integer" if kind is int else "a number"
        raise DataError(f"dataset {name!r}: option {key} must be {expected}, got {value!r}")
    if not low <= value <= high:
        raise DataError(f"dataset {name!r}: option {key} = {value} is outside [{low}, {high}]")
    return value


def read_dataset(name: str, options: dict[str, Any], cache_dir: str | Path) -> list[list[Conversation]]:
    """All conversations of one dataset's file, grouped per record (per message tree for oasst_export)."""
    skip = options.get("skip_bad_records", False)
    if not isinstance(skip, bool):
        raise DataError(f"dataset {name!r}: option skip_bad_records must be true or false, got {skip!r}")
    converter_options = {key: options[key] for key in SOURCES[name].options if key in options}
    if "top_k" in converter_options:
        converter_options["top_k"] = _number(name, options, "top_k", None, 1, float("inf"), int)
    if "lang" in converter_options and not isinstance(options["lang"], (str, list)):
        lang = options["lang"]
        raise DataError(f"dataset {name!r}: option lang must be a comma-separated string or a list, got {lang!r}")
    return read_units(name, _resolve_path(name, options, cache_dir), skip, converter_options)


def load_dataset(
    name: str, options: dict[str, Any], cache_dir: str | Path, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Read one dataset and split it by record (by tree for oasst_export): ``(train, eval)``."""
    val_split = _number(name, options, "val_split", DEFAULT_VAL_SPLIT, 0.0, 1.0)
    max_val_set = _number(name, options, "max_val_set", None, 0, float("inf"), int)
    fraction = _number(name, options, "fraction", 1.0, 0.0, 1.0)
    units = read_dataset(name, options, cache_dir)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    order = rng.permutation(len(units))
    n_val = round(len(units) * val_split)
    val_units, train_units = sorted(order[:n_val]), sorted(order[n_val:])
    train = [c for i in train_units for c in units[i]]
    val = [c for i in val_units for c in units[i]]
    if max_val_set is not None and len(val) > max_val_set:
        val = [val[i] for i in sorted(rng.choice(len(val), size=max_val_set, replace=False))]
    if fraction < 1.0:
        train = [train[i] for i in sorted(rng.choice(len(train), size=int(len(train) * fraction), replace=False))]
    log.info("%s: %d train and %d eval conversations (%d records)", name, len(train), len(val), len(units))
    return train, val


def _resolve_path(name: str, options: dict, cache_dir: str | Path) -> Path:
    file = options.get("input_file_path", SOURCES[name].default_file)
    if file is None:
        raise DataError(f"dataset {name!r} needs the option input_file_path")
    if not isinstance(file, (str, Path)):
        raise DataError(f"dataset {name!r}: input_file_path must be a path, got {file!r}")
    path = Path(cache_dir) / Path(file).expanduser()
    if not path.is_file():
        hint = "" if "input_file_path" in options else " (default file name; set input_file_path to change it)"
        raise DataError(f"dataset {name!r}: file not found: {path}{hint}")
    return path


def read_units(
    name: str, path: Path, skip: bool = False, converter_options: dict | None = None
) -> list[list[Conversation]]:
    """Conversations of every record of one file, grouped per record (per tree for oasst_export)."""
    bad = BadRecords(path, skip)
    convert = SOURCES[name].convert
    units = []
    for where, record in read_records(path, bad):
        try:
            conversations = convert(record, **(converter_options or {}))
        except RecordError as error:
            bad.report(f"{where}: {error}")
            continue
        if conversations:
            units.append(conversations)
    if bad.count:
        log.warning("%s: skipped %d bad record(s) in %s; first: %s", name, bad.count, path, bad.first)
    return units
