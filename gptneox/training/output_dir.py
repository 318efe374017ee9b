"""The output directory's rules: one run per directory, one run at a time, refused at once if unwritable.

A directory that holds another run's records (checkpoints, metrics, an exported model) is refused unless the
command line says what to do with them: --resume continues that run, --overwrite_output_dir deletes them
first. Without the rule a rerun appended to the old metrics and, when its last step number matched the old
run's, skipped its final save and exported the old weights. A run that failed before its first save leaves
set-up files only (its configs, the model files under checkpoints/model, an empty metrics.jsonl): nothing of
it would be lost, so the same command goes on into them.

The run's input is never at risk: a directory the run reads its model, tokenizer or data from is refused as
output_dir, and a model that no run wrote (weights without any run file) is refused even with
--overwrite_output_dir, which deletes a run's own files and nothing else; the final export would replace it.

A lock file keeps a second run out while the first one lives. It is held with flock, which the kernel drops
when its holder dies however it dies, so the lock of a killed run is taken over (with a note naming it);
the file records pid, host and start time for the message the second run prints.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from gptneox.errors import UserError

LOCK_NAME = "train.lock"
# What a run writes into its output directory (the loop and the metrics logger write them by these names),
# then the exported model.
CHECKPOINTS_DIR, METRICS_FILE, TENSORBOARD_DIR = "checkpoints", "metrics.jsonl", "tensorboard"
TRAIN_CONFIG_FILE, DS_CONFIG_FILE = "train_config.yaml", "ds_config.resolved.json"
RUN_FILES = (CHECKPOINTS_DIR, METRICS_FILE, TENSORBOARD_DIR, TRAIN_CONFIG_FILE, DS_CONFIG_FILE)
EXPORTED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
EXPORTED_ADAPTER = "adapter"  # a LoRA run's adapter in peft's format
EXPORTED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json")
MODEL_FILES_DIR = "model"  # checkpoints/model: config and tokenizer, written at start (gptneox.training.export)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutputDirError(UserError):
    """An output directory this run may not use; the message says why and which flag changes that."""


def check_writable(directory: str | Path, key: str = "output_dir") -> None:
    """Create `directory` if needed and write a file in it: a read-only mount or a directory of another
    user fails here, in the first second, not at the first save an hour later."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as err:
        raise OutputDirError(f"{key} {directory} is not writable ({err.strerror or err})") from None


@contextlib.contextmanager
def removed_if_failed_empty(*directories: str | Path | None):
    """Directories this run creates (output_dir, log_dir, with any missing parents) are removed again when the
    run fails while they are still empty: a config or data error before training leaves nothing behind."""
    created = []
    for directory in filter(None, directories):
        path = Path(directory).absolute()
        while not path.exists() and path != path.parent:
            created.append(path)
            path = path.parent
    try:
        yield
    except BaseException:
        for path in sorted(set(created), key=lambda p: len(p.parts), reverse=True):  # children first
            with contextlib.suppress(OSError):  # not empty (or gone): left as it is
                path.rmdir()
        raise


def previous_run(directory: str | Path) -> list[str]:
    """The files of an earlier run in `directory` when it trained (a checkpoint, a metrics line, an exported
    model beside run files); [] for nothing of a run, or for the set-up files of one that never saved."""
    directory = Path(directory)
    present = [name for name in RUN_FILES if (directory / name).is_file() or _non_empty_dir(directory / name)]
    weights = _exported_weights(directory)
    checkpoints, metrics = directory / CHECKPOINTS_DIR, directory / METRICS_FILE
    saved = checkpoints.is_dir() and any(path.name != MODEL_FILES_DIR for path in checkpoints.iterdir())
    logged = metrics.is_file() and metrics.stat().st_size > 0
    return present + weights if saved or logged or (weights and present) else []


def foreign_model(directory: str | Path) -> list[str]:
    """The model files in `directory` when no run wrote them (weights, and not one run file beside them)."""
    directory = Path(directory)
    weights = _exported_weights(directory)
    if not weights or any((directory / name).exists() for name in RUN_FILES):
        return []
    return ["config.json"] * (directory / "config.json").is_file() + weights


def _non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _exported_weights(directory: Path) -> list[str]:
    return sorted({p.name for pattern in EXPORTED_WEIGHTS for p in directory.glob(pattern)})


def _remove_previous_run(directory: Path) -> None:
    for name in RUN_FILES:
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for pattern in EXPORTED_WEIGHTS + EXPORTED_FILES:
        for path in directory.glob(pattern):
            path.unlink()
    shutil.rmtree(directory / EXPORTED_ADAPTER, ignore_errors=True)


class RunLock:
    """The lock of one run on its output directory (taken by rank 0 for the whole job)."""

    def __init__(self, path: Path, handle, taken_over: str | None):
        self.path, self._handle = path, handle
        self.taken_over = taken_over  # who held the lock before and died, for a note; None if nobody

    @classmethod
    def acquire(cls, directory: str | Path) -> "RunLock":
        path = Path(directory) / LOCK_NAME
        while True:
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(path)
                handle.close()
                raise OutputDirError(f"output_dir {directory} is in use by {holder} (lock file {path}); wait for "
                                     "that run to end or choose another output_dir") from None
            except OSError as err:  # a filesystem without flock: decide by the recorded pid
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _refuse_if_alive(path, directory)
            # the previous holder may have deleted the file between our open and our lock
            try:
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        previous = handle.read().strip()
        lock = cls(path, handle, _describe(previous) if previous else None)
        try:
            handle.seek(0)
            handle.truncate()
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                      handle)
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as err:
            lock.release()
            if err.errno in NO_SPACE:
                raise OutputDirError(f"no space left on device while writing the lock file {path}: free some "
                                     "space in output_dir, then run the same command again") from None
            raise
        return lock

    def release(self) -> None:
        """Delete the lock file (still ours: nobody else can lock it while we hold it) and drop the lock."""
        if self._handle.closed:
            return
        self.path.unlink(missing_ok=True)
        try:
            self._handle.close()  # flushes what is buffered: on a full disk that fails, and nothing is lost
        except OSError:
            pass


def claim_output_dir(directory: str | Path, *, resume: bool, overwrite: bool,
                     inputs: dict[str, Path] | None = None) -> RunLock:
    """Lock `directory` for this run after checking the rules; the caller releases the lock at the end.
    `inputs` names the directories the run reads (gptneox.training.model_files.input_directories)."""
    directory = Path(directory)
    if resume and overwrite:
        raise OutputDirError("--resume continues the run in output_dir and --overwrite_output_dir deletes it: "
                             "choose one")
    for key, source in (inputs or {}).items():
        if directory.resolve() == Path(source).resolve():
            raise OutputDirError(f"output_dir {directory} is the directory that {key} is read from: the run would "
                                 "write over its input; choose another output_dir (one beside or below it is fine)")
    model = foreign_model(directory)
    if model:
        raise OutputDirError(f"output_dir {directory} holds a model that no run wrote ({', '.join(model)}): the "
                             "final export would replace it; choose another output_dir")
    check_writable(directory)
    lock = RunLock.acquire(directory)  # before looking, so two new runs cannot both find the directory empty
    try:
        found = previous_run(directory)
        if found and not resume:
            if not overwrite:
                raise OutputDirError(f"output_dir {directory} holds another run ({', '.join(found)}): pass "
                                     "--resume to continue it, or --overwrite_output_dir to delete it and start "
                                     "over")
            _remove_previous_run(directory)
    except BaseException:
        lock.release()
        raise
    return lock


def _holder(path: Path) -> str:
    try:
        return _describe(path.read_text().strip())
    except OSError:
        return "another run"


def _describe(content: str) -> str:
    try:
        record = json.loads(content)
        return f"pid {record['pid']} on host {record['host']} (started {record['started']})"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"another run ({content[:80]!r})"


def _refuse_if_alive(path: Path, directory: str | Path) -> None:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return
    pid, host = record.get("pid"), record.get("host")
    if pid is None or pid == os.getpid():
        return
    if host != socket.gethostname() or _alive(pid):
        raise OutputDirError(f"output_dir {directory} is in use by {_describe(json.dumps(record))} (lock file "
                             f"{path}; this filesystem has no flock, so if that run is gone, delete the file)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
