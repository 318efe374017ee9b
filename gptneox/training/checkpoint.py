"""DeepSpeed checkpoints that are written completely or not at all, with rotation, the save policy of the
loop, and the training state that makes a resume continue exactly.

DeepSpeed's own `latest` file is written by rank 0 while other ranks may still be writing, so a crash can
leave it pointing at a half-written tag. Here every rank writes the tag with `save_latest=False`, all ranks
meet at a barrier, and only then does rank 0 atomically replace our own pointer file (`checkpoints.json`:
the complete tags, newest last). Resume reads that pointer only; tags it does not list (a save that died
half-way) are ignored and cleaned up by the next rotation.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptneox.errors import UserError
from gptneox.training.distributed import barrier

POINTER = "checkpoints.json"


class CheckpointStateError(UserError):
    """A checkpoint directory that cannot be resumed from: unreadable, or from an incompatible run."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


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
                 every: int | None = None, last_step: int | None = None):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank
        self.strategy, self.every, self.last_step = strategy, every, last_step

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

    def resume(self, engine: Any, state: TrainState) -> str | None:
        """Load the newest complete checkpoint into the engine and `state`; its tag, or None when there is
        none. Collective."""
        saved = self.load(engine)
        if saved is None:
            return None
        state.resume_from(saved, self.directory / self.latest_tag())
        return self.latest_tag()

    def complete_tags(self) -> list[str]:
        path = self.directory / POINTER
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text())["complete"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointStateError(f"{path}: unreadable checkpoint pointer ({err})") from None

    def latest_tag(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def write(self, engine: Any, tag: str, client_state: dict) -> Path:
        """Write `tag` and make it the newest complete one. Collective: every rank calls it with the same tag."""
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        barrier()
        if self.rank == 0:
            tags = [t for t in self.complete_tags() if t != tag] + [tag]
            kept = tags[-self.keep:] if self.keep else tags
            self._write_pointer(kept)
            self._remove_unlisted(kept)
        barrier()
        return self.directory / tag

    def load(self, engine: Any) -> dict | None:
        """Load the newest complete checkpoint into the engine; returns its client state (None: nothing)."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise CheckpointStateError(f"{self.directory / tag}: listed in {POINTER} but DeepSpeed could not "
                                       "load it")
        return client_state

    def _write_pointer(self, tags: list[str]) -> None:
        temporary = self.directory / f".{POINTER}.tmp"
        with open(temporary, "w") as handle:
            json.dump({"latest": tags[-1], "complete": tags}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.directory / POINTER)

    def _remove_unlisted(self, kept: list[str]) -> None:
        """Delete rotated-out tags and leftovers of saves that never completed."""
        for entry in self.directory.iterdir():
            if entry.is_dir() and entry.name.startswith("step") and entry.name not in kept:
                shutil.rmtree(entry, ignore_errors=True)
