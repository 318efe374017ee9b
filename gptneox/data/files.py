"""Which files one dataset reads: ``input_file_path`` as a file, a list, a glob, a directory, a folder written
by ``datasets``' ``save_to_disk``, or an ``hf://datasets/...`` path into the Hugging Face cache.

Hub downloads come as shards (``train-00000-of-00002.parquet`` plus ``validation-00000-of-00001.parquet``),
so a dataset may span several files; the caller reads them in the order returned here (sorted within a
glob or a directory, as listed otherwise), so the same files always give the same records in the same order.
A stock source whose stock file is not in ``cache_dir`` finds it in its reference hub repo in the cache.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from gptneox.data import hub_datasets
from gptneox.data.readers import FORMATS, DataError, record_format

GLOB_CHARACTERS = "*?["
SAVED_STATE = "state.json"  # a folder written by Dataset.save_to_disk
DEFAULT_HINT = " (default file name; set input_file_path to change it)"
SAVED_SPLITS = "dataset_dict.json"  # a folder written by DatasetDict.save_to_disk: one such folder per split


def dataset_files(name: str, spec: Any, cache_dir: str | Path, default_used: bool = False,
                  hub_repo: str | None = None, stock_files: tuple[str, ...] = ()) -> list[Path]:
    """The files of dataset ``name``; relative paths are taken from ``cache_dir``. A file named as one of
    ``stock_files`` that is not where it is named is looked up in ``hub_repo`` in the Hugging Face cache."""
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise DataError(f"dataset {name!r}: input_file_path is an empty list")
    files: list[Path] = []
    for item in specs:
        if not isinstance(item, (str, Path)):
            raise DataError(f"dataset {name!r}: input_file_path must be a path, a glob, a directory, an "
                            f"hf://datasets/ path or a list of them, got {item!r}")
        if hub_datasets.is_hub_path(item):
            hub = hub_datasets.parse_hub_path(name, item)
            files.extend(f for path in hub_datasets.resolve(name, hub) for f in _expand(name, path, False))
            continue
        path = Path(cache_dir) / Path(item).expanduser()
        if hub_repo and path.name in stock_files and not path.exists():
            files.extend(_from_reference_repo(name, path, hub_repo, default_used))
            continue
        files.extend(_expand(name, path, default_used))
    repeated = sorted({str(f) for f in files if files.count(f) > 1})
    if repeated:
        raise DataError(f"dataset {name!r}: input_file_path names {', '.join(repeated)} more than once")
    return files


def _from_reference_repo(name: str, path: Path, repo_id: str, default_used: bool) -> list[Path]:
    try:
        found = hub_datasets.reference_files(name, repo_id, path.name)
    except DataError as error:
        hint = DEFAULT_HINT if default_used else ""
        raise DataError(f"dataset {name!r}: file not found: {path}{hint}, and the reference's hub dataset "
                        f"{str(error).removeprefix(f'dataset {name!r}: ')}") from None
    return [f for p in found for f in _expand(name, p, False)]


def _expand(name: str, path: Path, default_used: bool) -> list[Path]:
    if any(c in str(path) for c in GLOB_CHARACTERS) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"dataset {name!r}: no file matches {path}")
        return matches
    if path.is_dir():
        if (path / SAVED_STATE).is_file() or (path / SAVED_SPLITS).is_file():
            return saved_dataset_files(path)
        matches = sorted(p for p in path.iterdir() if p.is_file() and record_format(p))
        if not matches:
            raise DataError(f"dataset {name!r}: directory {path} holds no {', '.join(FORMATS)} file "
                            "(optionally .gz) and is not a folder written by datasets' save_to_disk")
        return matches
    if not path.is_file():
        hint = DEFAULT_HINT if default_used else ""
        raise DataError(f"dataset {name!r}: file not found: {path}{hint}{_split_hint(path)}")
    return [path]


def _split_hint(path: Path) -> str:
    """For a path into a DatasetDict folder written by save_to_disk (``folder/split``), the splits it has."""
    if not (path.parent / SAVED_SPLITS).is_file():
        return ""
    try:
        splits = _json_field(path.parent / SAVED_SPLITS, "splits", list)
    except DataError as error:
        return f"; {path.parent} is a DatasetDict folder written by save_to_disk, but {error}"
    return (f"; {path.parent} is a DatasetDict folder written by save_to_disk whose splits are "
            f"{', '.join(map(str, splits)) or 'none'}")


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow shards of a ``save_to_disk`` folder in the order its ``state.json`` lists them; for a
    DatasetDict, those of its train and validation splits (every split if none is named so)."""
    if (folder / SAVED_SPLITS).is_file():
        splits = _json_field(folder / SAVED_SPLITS, "splits", list)
        chosen = [s for s in splits if s in hub_datasets.TRAINING_SPLITS] or splits
        return [f for split in chosen for f in saved_dataset_files(folder / str(split))]
    state = folder / SAVED_STATE
    if _json_field(state, "_indices_data_files", (list, type(None)), required=False):
        raise DataError(f"{state}: the dataset has an indices mapping (_indices_data_files), which older datasets "
                        "versions saved beside the data; save it again with a current datasets version")
    files = []
    for index, entry in enumerate(_json_field(state, "_data_files", list)):
        file_name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise DataError(f"{state}: _data_files[{index}] must be {{\"filename\": NAME}} naming a file in the "
                            f"folder, got {entry!r}")
        if not (folder / file_name).is_file():
            raise DataError(f"{state}: _data_files[{index}] names {file_name}, which is not in {folder}")
        files.append(folder / file_name)
    return files


def _json_field(path: Path, key: str, kind: type | tuple, required: bool = True) -> Any:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON, not UTF-8, an integer of too many digits
        raise DataError(f"{path}: unreadable ({error})") from None
    if not isinstance(content, dict) or (required and key not in content):
        raise DataError(f"{path}: no {key!r} key")
    value = content.get(key)
    if not isinstance(value, kind):
        raise DataError(f"{path}: {key!r} must be a {getattr(kind, '__name__', 'list')}, got {value!r}")
    return value
