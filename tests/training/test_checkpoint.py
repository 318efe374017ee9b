"""Checkpoint pointer, rotation, incomplete saves and the random generators' state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptneox.training.checkpoint import POINTER, CheckpointManager, restore_rng_states, rng_states, tag_for


class _FakeEngine:
    """Writes a tag directory the way engine.save_checkpoint does; `fail` simulates a crash mid-save."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        assert save_latest is False
        (Path(directory) / tag).mkdir(parents=True)
        if self.fail:
            raise OSError("disk full")
        (Path(directory) / tag / "state.json").write_text(json.dumps(client_state))


def test_checkpoint_rotation_and_incomplete_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    for step in (10, 20, 30):
        manager.write(_FakeEngine(), tag_for(step), {"step": step})
    assert manager.complete_tags() == [tag_for(20), tag_for(30)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for(20), tag_for(30)]
    with pytest.raises(OSError):
        manager.write(_FakeEngine(fail=True), tag_for(40), {"step": 40})
    assert manager.latest_tag() == tag_for(30)  # the half-written tag is not used ...
    manager.write(_FakeEngine(), tag_for(50), {"step": 50})
    assert not (tmp_path / tag_for(40)).exists()  # ... and is cleaned up by the next rotation
    assert json.loads((tmp_path / POINTER).read_text())["latest"] == tag_for(50)


def test_rng_state_is_the_current_gpus_only(monkeypatch):
    """One state per visible GPU would not restore on a node with fewer GPUs."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    states = rng_states()
    restore_rng_states(states)
    assert restored == [states["cuda"]] and states["cuda"].tolist() == [7]
