"""DeepSpeed checkpoints that are written completely or not at all, with rotation and exact resume state.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

POINTER = "checkpoints.json"


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


class CheckpointManager:
    """Saves and finds checkpoints in `directory`; `keep` (None = all) complete ones are kept."""

    def __init__(self, directory: str | Path, keep: int | None, rank: int):
        self.directory = Path(directory)
        self.keep = keep
        self.rank = rank

    def complete_tags(self) -> list[str]:
        path = self.directory / POINTER
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text())["complete"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RuntimeError(f"{path}: unreadable checkpoint pointer ({err})") from None

    def latest_tag(self) -> str | None:
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engine: Any, tag: str, client_state: dict) -> Path:
        """Collective: every rank must call it with the same tag."""
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        _barrier()
        if self.rank == 0:
            tags = [t for t in self.complete_tags() if t != tag] + [tag]
            kept = tags[-self.keep:] if self.keep else tags
            self._write_pointer(kept)
            self._remove_unlisted(kept)
        _barrier()
        return self.directory / tag

    def load(self, engine: Any) -> dict | None:
        """Load the newest complete checkpoint into the engine; returns its client state (None: nothing)."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.directory / tag}: listed in {POINTER} but DeepSpeed could not load it")
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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
