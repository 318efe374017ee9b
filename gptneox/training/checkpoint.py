"""DeepSpeed checkpoints that are written completely or not at all, with rotation, the save policy of the
loop, and the training state that makes a resume continue exactly.

DeepSpeed's own `latest` file is written by rank 0 while other ranks may still be writing, so a crash can
leave it pointing at a half-written tag. Here every rank writes the tag with `save_latest=False`, all ranks
meet at a barrier, and only then does rank 0 atomically replace our own pointer file (`checkpoints.json`:
the complete tags, newest last). Before the pointer moves, rank 0 writes the tag's `run.json` (the run's
settings and the size of every file of the tag) and every rank flushes the tag to the device, so a node
crash cannot leave a listed tag empty. Resume reads that pointer only; tags it does not list (a save that
died half-way) are ignored and cleaned up by the next rotation. A listed tag that is missing or damaged
(a file gone, shorter than recorded, or not a complete zip) is passed over for the previous complete one,
with a warning naming the file; so is an unreadable pointer, by looking at the tags themselves. A pointer
entry that is not a tag name as tag_for writes it (`../../elsewhere`) makes the pointer unreadable: it is
never followed, and rotation never deletes anything but tag directories of this folder.
A save that fails (a full disk above all) removes its partial tag on every rank and says what is intact.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptneox.errors import UserError
from gptneox.training.distributed import all_reduce, barrier, on_rank_zero
from gptneox.training.resume_check import RUN_RECORD, read_run_record, write_run_record
from gptneox.training.storage import DiskFullError, fsync_tree, out_of_space, remove_partial, write_atomically

POINTER = "checkpoints.json"


class CheckpointStateError(UserError):
    """A checkpoint directory that cannot be resumed from: unreadable, or from an incompatible run."""


TAG_NAME = re.compile(r"step[0-9]{8,}")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_tag_name(name: object) -> bool:
    """Whether `name` is a tag as tag_for writes it: a directory right in the checkpoints folder. Anything else
    from checkpoints.json or --tag (a path outside it, say) is never loaded, exported or deleted."""
    return isinstance(name, str) and TAG_NAME.fullmatch(name) is not None


def _tag_order(tag: str) -> int:
    return int(tag[len("step"):])


def rng_states() -> dict:
    """Every random generator the loop touches, for bit-identical continuation after resume."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def restore_rng_states(states: dict) -> None:
    """The CUDA state is the current device's only: each rank uses one GPU, and a node may have fewer."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


@dataclass
class TrainState:
    """Where the loop stands in the data: saved with every checkpoint (as DeepSpeed client state), so that a
    resumed run takes the same samples, windows and random numbers as an uninterrupted one. The data order
    is a pure function of (data_seed, epoch, step in epoch) for a training set of num_samples and a global
    batch of global_batch_size (see data_order), so those must match on resume."""

    data_seed: int
    global_batch_size: int
    num_samples: int | None
    epoch: int = 0
    step_in_epoch: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return (self.num_samples or 0) // self.global_batch_size

    @property
    def epoch_done(self) -> bool:
        return self.step_in_epoch == self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    def advance(self) -> None:
        """Before a step: past the end of an epoch, the next epoch begins."""
        if self.epoch_done:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def client_state(self) -> dict:
        """The dict saved with a checkpoint, with every random generator's state taken now."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "data_seed": self.data_seed,
                "global_batch_size": self.global_batch_size, "num_samples": self.num_samples,
                "rng": rng_states()}

    def resume_from(self, saved: dict, where: Path) -> None:
        """Take the position of a checkpoint's client state and restore its random generators; refused
        (one line naming both runs' values) when the checkpoint's run would order the data differently.
        A checkpoint from before num_samples was saved counts as different."""
        theirs = (saved.get("data_seed"), saved.get("global_batch_size"), saved.get("num_samples"))
        ours = (self.data_seed, self.global_batch_size, self.num_samples)
        if theirs != ours:
            raise CheckpointStateError(
                f"resume: {where} has rng_seed/global batch/training conversations {'/'.join(map(str, theirs))}, "
                f"this run {'/'.join(map(str, ours))}; the data order would not continue")
        self.epoch, self.step_in_epoch = saved["epoch"], saved["step_in_epoch"]
        restore_rng_states(saved["rng"])


class CheckpointManager:
    """Saves and finds checkpoints in `directory`; `keep` (None = all) complete ones are kept.

    The save policy is the manager's: `save_if_due` after every step saves at the last step, at the end of
    each epoch (strategy "epoch") or every `every` steps (strategy "steps"); `save` (also used for a stop
    or a fatal overflow) saves a step once only.
    """

    def __init__(self, directory: str | Path, keep: int | None, rank: int, *, strategy: str = "steps",
                 every: int | None = None, last_step: int | None = None, run: dict | None = None):
        """`run` is this run's settings (resume_check.run_record), written into each tag's run.json."""
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        self.strategy, self.every, self.last_step = strategy, every, last_step
        self.run = run or {}
        self._relist: list[str] | None = None  # usable_tag's complete tags, when the pointer lists others

    def due(self, step: int, state: TrainState) -> bool:
        """Whether the policy saves after optimizer step `step` (1-based) that left the loop at `state`."""
        return step == self.last_step or (
            self.strategy == "epoch" and state.epoch_done) or (
            self.strategy == "steps" and self.every is not None and step % self.every == 0)

    def save_if_due(self, engine: Any, state: TrainState) -> Path | None:
        return self.save(engine, state) if self.due(engine.global_steps, state) else None

    def save(self, engine: Any, state: TrainState) -> Path | None:
        """Save the engine's current step with `state`; None when that step is already the newest complete
        checkpoint: saving a tag again (a signal or a stop right after a save) would rewrite the only
        complete checkpoint in place, and a kill during that would leave none. Collective."""
        tag = tag_for(engine.global_steps)
        if self.latest_tag() == tag:
            return None
        return self.write(engine, tag, state.client_state())

    def resume(self, engine: Any, state: TrainState, tag: str | None) -> str | None:
        """Load `tag` (from usable_tag) into the engine and `state`; the tag, or None when it is None.
        Collective."""
        if tag is None:
            return None
        self.drop_passed_over()
        saved = self.load(engine, tag)
        state.resume_from(saved, self.directory / tag)
        return tag

    def usable_tag(self, warn=lambda message: print(message, file=sys.stderr)) -> str | None:
        """The newest listed tag whose files are all there and whole, decided on rank 0 for every rank;
        each one passed over, and an unreadable pointer, is a warning naming the file. Damaged tags leave
        the pointer when the resume goes ahead (drop_passed_over), so that rotation does not count them.
        Collective."""
        def decide() -> str | None:
            broken = False
            try:
                listed = self.complete_tags()
            except CheckpointStateError as err:
                broken = True
                listed = sorted((p.name for p in self.directory.glob("step*")
                                 if is_tag_name(p.name) and (p / RUN_RECORD).is_file()), key=_tag_order)
                warn(f"warning: {err}; looking at the tags themselves ({', '.join(listed) or 'none found'})")
            usable = []
            for tag in listed:
                damage = tag_damage(self.directory / tag)
                if damage:
                    warn(f"warning: checkpoint {tag} is damaged ({damage}); it is not used")
                else:
                    usable.append(tag)
            if listed and not usable:
                raise CheckpointStateError(f"{self.directory}: no complete checkpoint is left to resume from "
                                           f"(damaged: {', '.join(listed)})")
            if usable and (usable != listed or broken):
                warn(f"warning: resuming from {usable[-1]}, the newest complete checkpoint")
            if usable != listed or broken:
                self._relist = usable  # by resume(): a resume refused after this writes nothing
            return usable[-1] if usable else None
        return on_rank_zero(decide, share=True)

    def drop_passed_over(self) -> None:
        """Take the tags usable_tag passed over off the pointer (rank 0), once the resume goes ahead: a resume
        refused after usable_tag writes nothing. An unreadable pointer with no tag left to list is removed: the
        run starts from scratch, and its first save must not trip over it."""
        if self._relist is not None:
            if self._relist:
                self._list(self._relist)
            else:
                (self.directory / POINTER).unlink(missing_ok=True)
            self._relist = None

    def complete_tags(self) -> list[str]:
        path = self.directory / POINTER
        if not path.is_file():
            return []
        try:
            tags = json.loads(path.read_text())["complete"]
            if not isinstance(tags, list):
                raise TypeError(f"'complete' is {tags!r}, not a list of tags")
            for tag in tags:
                if not is_tag_name(tag):
                    raise TypeError(f"'complete' holds {tag!r}, not a tag name like {tag_for(0)}")
            return tags
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointStateError(f"{path}: unreadable checkpoint pointer ({err})") from None

    def _list(self, tags: list[str]) -> None:
        """Make `tags` (oldest first) the pointer's complete ones, atomically."""
        write_atomically(self.directory / POINTER, json.dumps({"latest": tags[-1], "complete": tags}))

    def newest_line(self) -> str:
        """Which checkpoint is the newest complete one, for a message."""
        tag = self.latest_tag()
        return (f"the newest checkpoint is {self.directory / tag}" if tag else
                f"there is no checkpoint in {self.directory}")

    def latest_tag(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def write(self, engine: Any, tag: str, client_state: dict) -> Path:
        """Write `tag` and make it the newest complete one. Collective: every rank calls it with the same tag."""
        tag_dir = self.directory / tag
        failure, failed, saved = None, 0.0, False
        try:
            # a LoRA run's frozen base is not saved: its tags hold the adapters and their optimizer state
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False,
                                   exclude_frozen_parameters=True)
            saved = True
            if self.rank == 0:  # DeepSpeed ends its save with a barrier: every rank's files are written
                write_run_record(tag_dir, {**self.run, "files": _file_sizes(tag_dir)})
            fsync_tree(tag_dir)
        except Exception as err:
            if not saved:
                barrier()  # the ranks that did not fail wait in the barrier that ends DeepSpeed's save
            failure, failed = err, 2.0 if out_of_space(err, self.directory) else 1.0
        failed = all_reduce(torch.tensor([failed], device=engine.device), op=torch.distributed.ReduceOp.MAX).item()
        if failed:
            self._fail(tag, failure, out_of_space=failed == 2.0)
        if self.rank == 0:
            tags = [t for t in self.complete_tags() if t != tag] + [tag]
            kept = tags[-self.keep:] if self.keep else tags
            self._list(kept)
            self._remove_unlisted(kept)
        barrier()
        return tag_dir

    def _fail(self, tag: str, failure: Exception | None, out_of_space: bool) -> None:
        """After a failed save on any rank: rank 0 removes the partial tag, every rank raises."""
        if self.rank == 0:
            remove_partial(self.directory / tag)
        barrier()
        previous = self.latest_tag()
        intact = (f"the previous checkpoint {self.directory / previous} is intact" if previous else
                  "there is no earlier complete checkpoint")
        if out_of_space:
            raise DiskFullError(f"no space left on device while saving checkpoint {tag} in {self.directory}; "
                                f"{intact}; the partial {tag} was removed") from failure
        if failure is not None:
            raise failure
        raise RuntimeError(f"saving checkpoint {tag} failed on another rank; {intact}")

    def load(self, engine: Any, tag: str) -> dict:
        """Load `tag` into the engine; returns its client state."""
        frozen = any(not p.requires_grad for p in engine.module.parameters())  # LoRA: only adapters are saved
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag, load_module_strict=not frozen)
        if path is None:
            raise CheckpointStateError(f"{self.directory / tag}: listed in {POINTER} but DeepSpeed could not "
                                       "load it")
        return client_state

    def _remove_unlisted(self, kept: list[str]) -> None:
        """Delete rotated-out tags and leftovers of saves that never completed."""
        for entry in self.directory.iterdir():
            if entry.is_dir() and is_tag_name(entry.name) and entry.name not in kept:
                shutil.rmtree(entry, ignore_errors=True)


def tag_damage(tag_dir: Path) -> str | None:
    """What is wrong with a tag's files, naming the first bad one; None when all are there and whole.
    Tags with a run.json are checked against its file sizes; older ones by their torch files only."""
    if not tag_dir.is_dir():
        return f"{tag_dir} is missing"
    try:
        record = read_run_record(tag_dir) or {}
    except UserError as err:
        return str(err)
    expected = record.get("files") or {p.name: None for p in tag_dir.glob("*.pt")}
    if not any(name.endswith("model_states.pt") for name in expected):
        return f"{tag_dir} holds no model states"
    for name, size in sorted(expected.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        if name.endswith(".pt") and not zipfile.is_zipfile(path):
            return f"{path} is truncated or not a torch file"
    return None


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != RUN_RECORD}

