"""Build the training mix and the per-dataset evaluation sets from a datasets config.

A config is a list like the reference's ``oasst-mix``::

    - oasst_export: {lang: "en,de", input_file_path: trees.jsonl.gz, top_k: 2}
    - vicuna: {val_split: 0.05, max_val_set: 800}

Options every dataset takes:
  ``input_file_path`` (a file, a glob, a directory, a ``save_to_disk`` folder, an ``hf://datasets/``
  path into the Hugging Face cache, or a list of them, relative to ``cache_dir``; a per-dataset default
  file name otherwise, looked up in the reference's hub repo when cache_dir lacks it),
  ``val_split`` (default 0.2, the reference's),
  ``max_val_set`` (evaluation set capped by sampling without replacement), ``fraction`` (keep this
  share of the training conversations, sampled once here; the reference applied it only with its
  custom sampler), ``skip_bad_records`` (count and log bad records instead of stopping).

All randomness is seeded by ``seed`` and the dataset name, so the same config gives the same split in
every process. The split is over *units* (whole message trees for oasst_export), so no tree has
threads on both sides. ``train.py`` and the tools that report on a run's data (``data_report``,
``padding_report``) load it through ``load_run_datasets``, so they all see the same conversations.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gptneox.data.files import dataset_files
from gptneox.data.formatting import Conversation
from gptneox.data.readers import BadRecords, DataError, RecordError, read_records
from gptneox.data.sources import BAD_RECORD, SOURCES, UNREAD_REST

log = logging.getLogger(__name__)

COMMON_OPTIONS = ("input_file_path", "val_split", "max_val_set", "fraction", "skip_bad_records")
DEFAULT_VAL_SPLIT = 0.2


@dataclass
class LoadedDataset:
    """One dataset of the mix after reading and splitting, with the counts of its log line."""

    name: str
    files: list[Path]
    records: int  # records read from the files (message rows for the hub oasst layout)
    conversations: int  # conversations made, before max_val_set and fraction
    drops: Counter  # reason -> records (or oasst threads) that gave no conversation
    train: list[Conversation]
    eval: list[Conversation]

    def summary(self) -> str:
        """The dataset's one log line: what was read, what was made, and every reason something was dropped."""
        dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(self.drops.items())) or "nothing"
        left_out = self.conversations - len(self.train) - len(self.eval)
        cut = f", {left_out} left out by max_val_set/fraction" if left_out else ""
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files in {_common_folder(self.files)}"
        return (f"{self.name}: {self.records} records read from {files}, {self.conversations} conversations made "
                f"({len(self.train)} train, {len(self.eval)} eval{cut}); dropped: {dropped}")


def _common_folder(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def load_run_datasets(cfg: Any) -> list[LoadedDataset]:
    """The datasets of a training config (``datasets``, ``cache_dir``, ``rng_seed``), exactly as the training
    loop reads them: every data tool calls this, so its counts are the run's counts. (``eval_size`` is applied
    by the Evaluator.)"""
    return load_datasets(cfg.datasets, cfg.cache_dir, cfg.rng_seed)


def build_datasets(
    datasets_config: list[Any], cache_dir: str | Path = ".", seed: int = 0
) -> tuple[list[Conversation], dict[str, list[Conversation]]]:
    """Return ``(train_conversations, {dataset_name: eval_conversations})``; see ``merge_datasets``."""
    return merge_datasets(load_datasets(datasets_config, cache_dir, seed))


def merge_datasets(datasets: list[LoadedDataset]) -> tuple[list[Conversation], dict[str, list[Conversation]]]:
    """Training conversations concatenated in config order, and the evaluation sets by dataset name (a
    dataset with no evaluation conversations has no entry). An empty training set is refused."""
    train = [conversation for dataset in datasets for conversation in dataset.train]
    if not train:
        names = ", ".join(d.name for d in datasets) or "no dataset is configured"
        raise DataError(f"the training set is empty ({names}): no dataset gave a training conversation")
    return train, {dataset.name: dataset.eval for dataset in datasets if dataset.eval}


def load_datasets(datasets_config: list[Any], cache_dir: str | Path = ".", seed: int = 0) -> list[LoadedDataset]:
    """Read and split every dataset of the config; each logs its summary line, an empty one a warning."""
    if not isinstance(datasets_config, list):
        raise DataError(
            f"datasets config must be a list of {{dataset_name: options}}, got {type(datasets_config).__name__}"
        )
    entries = [parse_entry(entry) for entry in datasets_config]
    names = [name for name, _ in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"dataset(s) {', '.join(repeated)} listed more than once in the datasets config")
    datasets = []
    for name, options in entries:
        dataset = load_dataset(name, options, cache_dir, seed)
        log.info("%s", dataset.summary())
        if not dataset.conversations:
            log.warning("dataset %s gives no conversations: %s", name, dataset.summary())
        datasets.append(dataset)
    return datasets


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


def read_dataset(name: str, options: dict[str, Any], cache_dir: str | Path) -> UnitsRead:
    """All conversations of one dataset's files, grouped per record (per message tree for oasst_export)."""
    skip = _flag(name, options, "skip_bad_records")
    converter_options = {key: options[key] for key in SOURCES[name].options if key in options}
    if "top_k" in converter_options:
        converter_options["top_k"] = _number(name, options, "top_k", None, 1, float("inf"), int)
    if "keep_final_answer" in converter_options:
        converter_options["keep_final_answer"] = _flag(name, options, "keep_final_answer")
    if "lang" in converter_options and not isinstance(options["lang"], (str, list)):
        lang = options["lang"]
        raise DataError(f"dataset {name!r}: option lang must be a comma-separated string or a list, got {lang!r}")
    return read_units(name, input_files(name, options, cache_dir), skip, converter_options)


def input_files(name: str, options: dict[str, Any], cache_dir: str | Path) -> list[Path]:
    """The files dataset ``name`` reads (its input_file_path, or the source's default file)."""
    spec = options.get("input_file_path", SOURCES[name].default_file)
    if spec is None:
        raise DataError(f"dataset {name!r} needs the option input_file_path")
    source = SOURCES[name]
    return dataset_files(name, spec, cache_dir, default_used="input_file_path" not in options,
                         hub_repo=source.hub_repo, stock_files=source.stock_files)


def _flag(name: str, options: dict, key: str) -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise DataError(f"dataset {name!r}: option {key} must be true or false, got {value!r}")
    return value


def load_dataset(name: str, options: dict[str, Any], cache_dir: str | Path, seed: int) -> LoadedDataset:
    """Read one dataset and split it by record (by tree for oasst_export)."""
    val_split = _number(name, options, "val_split", DEFAULT_VAL_SPLIT, 0.0, 1.0)
    max_val_set = _number(name, options, "max_val_set", None, 0, float("inf"), int)
    fraction = _number(name, options, "fraction", 1.0, 0.0, 1.0)
    read = read_dataset(name, options, cache_dir)
    units = read.units
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
    return LoadedDataset(name, read.files, read.records, sum(len(unit) for unit in units), read.drops, train, val)


class UnitsRead(NamedTuple):
    """What reading a dataset's files gave: conversations per unit, records read, drops by reason."""

    files: list[Path]
    units: list[list[Conversation]]
    records: int
    drops: Counter


def read_units(
    name: str, files: Path | list[Path], skip: bool = False, converter_options: dict | None = None
) -> UnitsRead:
    """Conversations of every record of the files, grouped per record (per tree for oasst_export).

    A source with ``gather`` (oasst_export's hub rows) collects its records across all files first, so a
    unit split over several files stays one unit.
    """
    files = [files] if isinstance(files, Path) else files
    source = SOURCES[name]
    bad = BadRecords(skip)
    drops: Counter = Counter()
    gathered = source.gather() if source.gather else None
    units: list[list[Conversation]] = []
    records = failed_conversions = 0

    def convert(path: Path, where: str, record: Any) -> None:
        nonlocal failed_conversions
        try:
            conversations = source.convert(record, drops, **(converter_options or {}))
        except (RecordError, RecursionError) as error:
            failed_conversions += 1
            bad.report(path, f"{where}: {error if isinstance(error, RecordError) else 'nested too deeply to read'}")
            return
        if conversations:
            units.append(conversations)

    for path in files:
        for where, record in read_records(path, bad):
            records += 1
            if not (gathered and gathered.take(path, where, record)):
                convert(path, where, record)
    records += bad.count - failed_conversions  # records too damaged to parse were read all the same
    if gathered:
        for path, where, build in gathered.trees():
            try:
                tree = build()
            except RecordError as error:
                bad.report(path, f"{where}: {error}")
                continue
            convert(path, where, tree)
    if bad.count:
        drops[BAD_RECORD] = bad.count
        log.warning("%s: skipped %d bad record(s); first: %s", name, bad.count, bad.first)
    if bad.unread_rests:
        drops[UNREAD_REST] = len(bad.unread_rests)
        for message in bad.unread_rests:
            log.warning("%s: %s; the records before it are kept", name, message)
    return UnitsRead(files, units, records, drops)
