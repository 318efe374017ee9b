"""Which files one dataset reads: ``input_file_path`` as a file, a list, a glob or a directory.

Hub downloads come as shards (``train-00000-of-00002.parquet`` plus ``validation-00000-of-00001.parquet``),
so a dataset may span several files; the caller reads them in the order returned here (sorted within a
glob or a directory, as listed otherwise), so the same files always give the same records in the same order.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from gptneox.data.readers import FORMATS, DataError, record_format

GLOB_CHARACTERS = "*?["


def dataset_files(name: str, spec: Any, cache_dir: str | Path, default_used: bool = False) -> list[Path]:
    """The files of dataset ``name``; relative paths are taken from ``cache_dir``."""
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise DataError(f"dataset {name!r}: input_file_path is an empty list")
    files: list[Path] = []
    for item in specs:
        if not isinstance(item, (str, Path)):
            raise DataError(f"dataset {name!r}: input_file_path must be a path, a glob, a directory or a list "
                            f"of them, got {item!r}")
        files.extend(_expand(name, Path(cache_dir) / Path(item).expanduser(), default_used))
    repeated = sorted({str(f) for f in files if files.count(f) > 1})
    if repeated:
        raise DataError(f"dataset {name!r}: input_file_path names {', '.join(repeated)} more than once")
    return files


def _expand(name: str, path: Path, default_used: bool) -> list[Path]:
    if any(c in str(path) for c in GLOB_CHARACTERS) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"dataset {name!r}: no file matches {path}")
        return matches
    if path.is_dir():
        matches = sorted(p for p in path.iterdir() if p.is_file() and record_format(p))
        if not matches:
            raise DataError(f"dataset {name!r}: directory {path} holds no {', '.join(FORMATS)} file "
                            "(optionally .gz)")
        return matches
    if not path.is_file():
        hint = " (default file name; set input_file_path to change it)" if default_used else ""
        raise DataError(f"dataset {name!r}: file not found: {path}{hint}")
    return [path]

