"""Dataset files in the Hugging Face cache, found offline as `gptneox.hub` finds models.

``hf://datasets/ORG/NAME/PATH-OR-GLOB`` is the spelling pandas, polars and duckdb use for a hub file
(``@REVISION`` after the name picks a branch or a commit); ``hf://datasets/ORG/NAME`` is every data file
of the repo. ``hf download ORG/NAME --repo-type dataset`` puts a repo in the cache as
``datasets--ORG--NAME/`` with ``refs/main``, ``snapshots/<commit>/`` (symlinks into ``blobs/``) and
``blobs/``. The snapshot used is the one the revision names, else (for ``main``) the newest other one,
provided it holds what was asked for and none of those files is a dangling link (a pruned blob).
Nothing is downloaded: a repo that is not there is a one-line error with the command that fetches it.

"Every data file of a repo" follows ``datasets``' default layout rule: if some file or folder names a
split (``train-00000-of-00002.parquet``, ``data/validation-*``, ``train/``), the train and validation
files, as the reference read ``train+validation``; otherwise every data file, sorted by path.
"""
from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from gptneox.data.readers import DataError, record_format
from gptneox.hub import find_snapshot

log = logging.getLogger(__name__)

PREFIX = "hf://datasets/"
GLOB_CHARACTERS = "*?["
# datasets' split keywords: a split is named at the start of a file or folder name, then a separator or digit
_SPLIT = re.compile(r"^(train|training|validation|valid|val|dev|test|testing|eval|evaluation)([-._ 0-9]|$)")
TRAINING_SPLITS = ("train", "training", "validation", "valid", "val", "dev")


@dataclass(frozen=True)
class HubPath:
    """``hf://datasets/ORG/NAME[@REVISION][/PATH]``; ``path`` is "" for the whole repo."""

    repo_id: str
    revision: str
    path: str

    def __str__(self) -> str:
        revision = "" if self.revision == "main" else f"@{self.revision}"
        return f"{PREFIX}{self.repo_id}{revision}" + (f"/{self.path}" if self.path else "")


def is_hub_path(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith("hf://")


def parse_hub_path(name: str, spec: str) -> HubPath:
    """The parts of an ``hf://datasets/...`` spelling, or a DataError naming what is wrong with it."""
    if not spec.startswith(PREFIX):
        raise DataError(f"dataset {name!r}: {spec!r} is not a hub dataset path; expected "
                        f"{PREFIX}ORG/NAME or {PREFIX}ORG/NAME/PATH-OR-GLOB (models are not read as data)")
    parts = spec[len(PREFIX):].split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DataError(f"dataset {name!r}: {spec!r} does not name a repo; expected {PREFIX}ORG/NAME[/PATH]")
    name_part, _, revision = parts[1].partition("@")
    path = "/".join(parts[2:]).strip("/")
    if not name_part or ("@" in parts[1] and not revision) or any(p in (".", "..") for p in path.split("/")):
        raise DataError(f"dataset {name!r}: {spec!r} is not a valid hub dataset path")
    return HubPath(f"{parts[0]}/{name_part}", revision or "main", path)


def resolve(name: str, hub: HubPath) -> list[Path]:
    """The local paths in the snapshot for ``hub``: a file, a folder or glob matches (expanded by the caller
    as local ones are), or for a whole repo its data files."""
    return _matches(_snapshot(name, hub, lambda s: _matches(s, hub.path)), hub.path)


def reference_files(name: str, repo_id: str, file_name: str) -> list[Path]:
    """A stock source's file from its reference repo: ``file_name`` anywhere in the snapshot (the first in
    path order), else every data file of the snapshot."""
    def found(snapshot: Path) -> list[Path]:
        named = sorted(snapshot.rglob(file_name))
        return named[:1] or repo_data_files(snapshot)
    return found(_snapshot(name, HubPath(repo_id, "main", ""), found))


def repo_data_files(folder: Path) -> list[Path]:
    """Every data file under ``folder`` (hidden ones aside); only the train and validation ones when some
    file or folder names a split."""
    files = sorted(p for p in folder.rglob("*") if not any(part.startswith(".") for part in
                   p.relative_to(folder).parts) and not p.is_dir() and record_format(p))
    split_of = {p: next((m.group(1) for part in p.relative_to(folder).parts if (m := _SPLIT.match(part))), None)
                for p in files}
    if any(split_of.values()):
        return [p for p in files if split_of[p] in TRAINING_SPLITS]
    return files


def _matches(snapshot: Path, path: str) -> list[Path]:
    if not path:
        return repo_data_files(snapshot)
    if any(c in path for c in GLOB_CHARACTERS):
        return sorted(Path(p) for p in glob.glob(str(snapshot / path), recursive=True))
    target = snapshot / path
    return [target] if target.exists() or target.is_symlink() else []


def _snapshot(name: str, hub: HubPath, matches) -> Path:
    def problem(snapshot: Path) -> str | None:
        found = matches(snapshot)
        if not found:
            return f"no {hub.path}" if hub.path else "no data file"
        for path in found:
            files = [path] if not path.is_dir() else [p for p in path.rglob("*") if not p.is_dir()]
            dangling = next((f for f in files if f.is_symlink() and not f.exists()), None)
            if dangling:
                return f"{dangling.relative_to(snapshot)} links to a missing blob"
        return None

    snapshot, looked = find_snapshot(hub.repo_id, problem, repo_type="dataset", revision=hub.revision)
    if snapshot is None:
        revision = "" if hub.revision == "main" else f" --revision {hub.revision}"
        raise DataError(f"dataset {name!r}: {hub} is not in the Hugging Face cache (looked at: {'; '.join(looked)}). "
                        f"Nothing is downloaded at run time: fetch it beforehand with "
                        f"`hf download {hub.repo_id} --repo-type dataset{revision}`")
    passed_over = [place for place in looked if place.startswith(str(snapshot.parent))]
    if passed_over:  # refs/main's snapshot lacks the files (a partial download): an older one is read
        log.warning("dataset %s: %s passed over; reading the older snapshot %s (hf download %s --repo-type "
                    "dataset completes the newest)", name, "; ".join(passed_over), snapshot.name, hub.repo_id)
    return snapshot
