"""Files that survive a crash and a full disk: durable writes, and telling a full disk from other failures.

Data written to a file, and a file created or renamed in a directory, may sit in the page cache for a while
after the call returns; a node that loses power then can come back with a checkpoint the pointer file lists
but whose files are empty or missing. So a checkpoint is flushed (every file, then every directory up to the
checkpoint root) before the pointer is moved, and the pointer itself is replaced atomically and flushed.

A full disk does not reach us as ENOSPC: torch's zip writer turns it into `RuntimeError: basic_ios::clear`
or `[enforce fail at inline_container.cc] unexpected pos`. So a failed write is judged by its error chain
and by the space the filesystem has left.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from gptneox.errors import UserError

# Below this much space available to us, a write that failed is taken to have failed for lack of space.
LOW_SPACE_BYTES = 16 * 2**20
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("no space left on device", "storagefull", "disk quota exceeded")


class DiskFullError(UserError, OSError):
    """A save that ran out of space; the message names what was being written and what is still intact."""


def fsync_path(path: str | Path) -> None:
    """Flush one file's data, or one directory's entries, to the device."""
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: str | Path) -> None:
    """Every file under `root`, then each directory bottom-up, then the directory holding `root`."""
    root = Path(root)
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(directory)
    fsync_path(root.parent)


def write_atomically(path: str | Path, text: str) -> None:
    """Readers see the old content or the new one, never a part; durable when this returns."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def out_of_space(error: BaseException, directory: str | Path) -> bool:
    """Whether `error`, raised while writing into `directory`, came from a full disk or quota."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS:
            return True
        if any(word in str(seen).lower() for word in _NO_SPACE_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < LOW_SPACE_BYTES
    except OSError:
        return False


def remove_partial(path: str | Path) -> None:
    """Delete what a failed write left; a directory or a file, gone or not."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
