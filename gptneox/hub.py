"""Where a model named on a command line is on disk: a local directory, or a snapshot in the Hugging Face
cache, found offline (dataset repos are found the same way: gptneox.data.hub_datasets).

huggingface_hub keeps each model as `models--org--name/` (each dataset as `datasets--org--name/`) with
`refs/main` (the commit of the main branch), `snapshots/<commit>/` (the files, symlinks into `blobs/`) and
`blobs/`. A download that was cut
short leaves a snapshot without some of its files, so only a complete one is used: the one `refs/main`
names, else the newest complete one. Nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from gptneox.weights import CheckpointError, checkpoint_files


def cache_dirs() -> list[Path]:
    """Where huggingface_hub may have put models and datasets, in its own order of precedence (each place
    once)."""
    places = []
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            places.append(Path(os.environ[variable]))
    if os.environ.get("HF_HOME"):
        places.append(Path(os.environ["HF_HOME"]) / "hub")
    if os.environ.get("XDG_CACHE_HOME"):
        places.append(Path(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    places.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(p.expanduser() for p in places))


def is_repo_id(name: str) -> bool:
    """`org/name` as the Hub spells model ids (not a path such as ./x, /x or a/b/c)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not any(p in (".", "..") or p.startswith("~") for p in parts)


def snapshot_problem(snapshot: Path) -> str | None:
    """Why a snapshot cannot be loaded (None when it is complete): config.json and every weight file."""
    if not (snapshot / "config.json").is_file():
        return "no config.json"
    try:
        checkpoint_files(snapshot)  # follows a shard index; a missing blob is a dangling symlink
    except (FileNotFoundError, CheckpointError) as err:
        return str(err).removeprefix(f"{snapshot}: ").removeprefix(f"{snapshot}/")
    return None


def repo_folder(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    """huggingface_hub's folder of a repo in a cache: `models--org--name`, `datasets--org--name`."""
    return cache / f"{repo_type}s--{repo_id.replace('/', '--')}"


def find_snapshot(repo_id: str, problem: Callable[[Path], str | None] = snapshot_problem,
                  repo_type: str = "model", revision: str = "main") -> tuple[Path | None, list[str]]:
    """(the snapshot to use, or None; what was looked at, for an error message). The snapshot `revision`
    names (a branch in `refs/`, or a commit), else, for `main` only, the newest other one; the first
    for which `problem` finds nothing wrong."""
    looked = []
    for cache in cache_dirs():
        repo = repo_folder(cache, repo_id, repo_type)
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            looked.append(f"{repo} (not there)")
            continue
        ref = repo / "refs" / revision
        named = snapshots / (ref.read_text().strip() if ref.is_file() else revision)
        first = [named] if ref.is_file() or named.is_dir() else []
        newest = [] if revision != "main" else sorted(
            (p for p in snapshots.iterdir() if p.is_dir() and p not in first), key=lambda p: p.stat().st_mtime,
            reverse=True)
        for snapshot in first + newest:
            why = problem(snapshot) if snapshot.is_dir() else "not there"
            if why is None:
                return snapshot, looked
            looked.append(f"{snapshot} ({why})")
        if not first and not newest:
            looked.append(f"{snapshots} ({'empty' if revision == 'main' else f'no revision {revision}'})")
    return None, looked


def find_model(name: str, bases: list[Path]) -> tuple[Path | None, list[str]]:
    """(the model directory for `name`, or None; every place looked at). `name` is taken relative to each
    of `bases` in turn (an absolute name is itself); an `org/name` id is then looked up in the cache."""
    looked = []
    for base in bases:
        path = Path(base) / Path(name).expanduser()
        if (path / "config.json").is_file():
            return path, looked
        looked.append(f"{path.resolve() / 'config.json'} (not there)")
    if is_repo_id(name):
        snapshot, cache_looked = find_snapshot(name)
        looked += [f"Hugging Face cache: {place}" for place in cache_looked]
        return snapshot, looked
    return None, looked
