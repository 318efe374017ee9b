"""Checkpoint pointer, rotation, incomplete saves and the random generators' state."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from gptneox.training import storage
from gptneox.training.checkpoint import (POINTER, CheckpointManager, CheckpointStateError, restore_rng_states,
                                         rng_states, tag_for)
from gptneox.training.storage import DiskFullError


class _FakeEngine:
    """Writes a tag directory the way engine.save_checkpoint does; `fail` simulates a crash mid-save."""

    device = torch.device("cpu")

    def __init__(self, fail: Exception | None = None):
        self.fail = fail

    def save_checkpoint(self, directory, tag, client_state, save_latest, exclude_frozen_parameters):
        assert save_latest is False and exclude_frozen_parameters is True
        (Path(directory) / tag).mkdir(parents=True)
        torch.save({"module": {}}, Path(directory) / tag / "mp_rank_00_model_states.pt")
        if self.fail:
            (Path(directory) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK partial")
            raise self.fail
        torch.save(client_state, Path(directory) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_checkpoint_rotation_and_incomplete_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    for step in (10, 20, 30):
        manager.write(_FakeEngine(), tag_for(step), {"step": step})
    assert manager.complete_tags() == [tag_for(20), tag_for(30)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for(20), tag_for(30)]
    with pytest.raises(OSError, match="I/O error"):
        manager.write(_FakeEngine(fail=OSError(errno.EIO, "I/O error")), tag_for(40), {"step": 40})
    assert manager.latest_tag() == tag_for(30)  # the half-written tag is not used ...
    assert not (tmp_path / tag_for(40)).exists()  # ... and is removed
    manager.write(_FakeEngine(), tag_for(50), {"step": 50})
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


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5248 vs 5140"),  # torch's words
])
def test_disk_full_names_what_is_intact_and_removes_the_partial_tag(tmp_path, monkeypatch, error):
    manager = CheckpointManager(tmp_path, keep=None, rank=0)
    manager.write(_FakeEngine(), tag_for(10), {"step": 10})
    if isinstance(error, RuntimeError):  # torch's message says nothing of space: the filesystem does
        monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: type("usage", (), {"free": 4096})())
    with pytest.raises(DiskFullError, match=f"^no space left on device while saving checkpoint {tag_for(20)} in "
                                            f"{tmp_path}; the previous checkpoint {tmp_path / tag_for(10)} is "
                                            f"intact; the partial {tag_for(20)} was removed$"):
        manager.write(_FakeEngine(fail=error), tag_for(20), {"step": 20})
    assert not (tmp_path / tag_for(20)).exists() and manager.complete_tags() == [tag_for(10)]


def test_files_and_directories_are_flushed_before_the_pointer_moves(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    CheckpointManager(tmp_path, keep=None, rank=0, run={"dtype": "fp32"}).write(_FakeEngine(), tag_for(1), {})
    moved = events.index(("replace", str(tmp_path / POINTER)))
    flushed = {path for kind, path in events[:moved] if kind == "fsync"}
    tag = tmp_path / tag_for(1)
    assert {str(p) for p in tag.iterdir()} | {str(tag), str(tmp_path)} <= flushed
    assert ("fsync", str(tmp_path)) in events[moved:]  # the rename itself
    assert json.loads((tag / "run.json").read_text())["files"]["mp_rank_00_model_states.pt"] > 0


def _three_tags(tmp_path):
    manager = CheckpointManager(tmp_path, keep=None, rank=0, run={"dtype": "fp32"})
    for step in (1, 2, 3):
        manager.write(_FakeEngine(), tag_for(step), {"step": step})
    return manager


@pytest.mark.parametrize("damage, named", [
    (lambda tag: shutil.rmtree(tag), "step00000003 is missing"),
    (lambda tag: (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()[:-40]),
     "zero_pp_rank_0_mp_rank_00_optim_states.pt has .* bytes, .* were written"),
    (lambda tag: (tag / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt is missing"),
])
def test_a_damaged_newest_tag_falls_back_to_the_previous_one_with_a_warning(tmp_path, damage, named):
    manager = _three_tags(tmp_path)
    damage(tmp_path / tag_for(3))
    warnings = []
    assert manager.usable_tag(warn=warnings.append) == tag_for(2)
    assert any("checkpoint step00000003 is damaged" in w and re.search(named, w) for w in warnings)
    assert manager.complete_tags() == [tag_for(1), tag_for(2), tag_for(3)]  # a resume refused now writes nothing
    manager.drop_passed_over()  # the resume goes ahead
    assert manager.complete_tags() == [tag_for(1), tag_for(2)]  # the damaged one leaves the pointer


def test_a_truncated_legacy_tag_without_run_json_is_caught_by_its_zip_structure(tmp_path):
    manager = _three_tags(tmp_path)
    optimizer = tmp_path / tag_for(3) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    (tmp_path / tag_for(3) / "run.json").unlink()
    optimizer.write_bytes(optimizer.read_bytes()[:-40])
    warnings = []
    assert manager.usable_tag(warn=warnings.append) == tag_for(2)
    assert f"{optimizer} is truncated or not a torch file" in warnings[0]


def test_a_corrupt_pointer_falls_back_to_the_tags_themselves(tmp_path):
    manager = _three_tags(tmp_path)
    (tmp_path / POINTER).write_text('{"latest": "step000')
    warnings = []
    assert manager.usable_tag(warn=warnings.append) == tag_for(3)
    assert f"{tmp_path / POINTER}: unreadable checkpoint pointer" in warnings[0]
    manager.drop_passed_over()
    assert manager.complete_tags() == [tag_for(1), tag_for(2), tag_for(3)]  # rewritten


def test_no_complete_tag_left_is_refused_naming_the_damage(tmp_path):
    manager = CheckpointManager(tmp_path, keep=None, rank=0)
    manager.write(_FakeEngine(), tag_for(1), {})
    (tmp_path / tag_for(1) / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointStateError, match="no complete checkpoint is left to resume from"):
        manager.usable_tag(warn=lambda message: None)


@pytest.mark.parametrize("pointer", [
    {"latest": "../../evil", "complete": ["../../evil"]},
    {"latest": tag_for(3), "complete": [tag_for(1), "step00000002/../../../evil", tag_for(3)]},
    {"latest": "evil", "complete": ["/tmp/evil"]},
])
def test_a_pointer_entry_that_is_not_a_tag_name_is_never_followed_nor_deleted(tmp_path, pointer):
    """checkpoints.json names a directory outside the checkpoints: an unreadable pointer like any other, so
    resume looks at the tags themselves, and rotation deletes only tags of this folder."""
    checkpoints = tmp_path / "run" / "checkpoints"
    manager = _three_tags(checkpoints)
    evil = tmp_path / "evil"
    shutil.copytree(checkpoints / tag_for(3), evil)  # loadable, if it were followed
    (checkpoints / "step_notes").mkdir()  # not a tag name: not ours to rotate away
    (checkpoints / POINTER).write_text(json.dumps(pointer))
    with pytest.raises(CheckpointStateError, match=f"{checkpoints / POINTER}: unreadable checkpoint pointer "
                                                   ".'complete' holds '.*', not a tag name like step00000000."):
        manager.latest_tag()
    warnings = []
    assert manager.usable_tag(warn=warnings.append) == tag_for(3)
    assert "unreadable checkpoint pointer" in warnings[0] and "evil" in warnings[0]
    assert warnings[-1] == f"warning: resuming from {tag_for(3)}, the newest complete checkpoint"
    manager.drop_passed_over()  # the resume goes ahead
    assert manager.complete_tags() == [tag_for(1), tag_for(2), tag_for(3)]
    manager.keep = 2
    manager.write(_FakeEngine(), tag_for(4), {"step": 4})
    assert manager.complete_tags() == [tag_for(3), tag_for(4)]
    assert sorted(p.name for p in checkpoints.iterdir()) == [POINTER, tag_for(3), tag_for(4), "step_notes"]
    assert (evil / "run.json").is_file() and (evil / "mp_rank_00_model_states.pt").is_file()


def test_an_unreadable_pointer_with_no_tag_left_is_removed_when_the_run_starts_over(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    (tmp_path / POINTER).write_text(json.dumps({"latest": "../evil", "complete": ["../evil"]}))
    warnings = []
    assert manager.usable_tag(warn=warnings.append) is None
    assert warnings == [f"warning: {tmp_path / POINTER}: unreadable checkpoint pointer ('complete' holds "
                        "'../evil', not a tag name like step00000000); looking at the tags themselves (none found)"]
    manager.drop_passed_over()
    assert not (tmp_path / POINTER).exists()
    manager.write(_FakeEngine(), tag_for(1), {})  # the first save of the new start
    assert manager.complete_tags() == [tag_for(1)]


@pytest.mark.parametrize("record", ["[1]", '"text"', "null", '{"files": [1]}', '{"files": {"a.pt": "big"}}',
                                    '{"model": [1]}', '{"lora": 1}', b"\xff\xfe"])
def test_a_run_json_that_is_not_a_record_is_damage_not_a_crash(tmp_path, record):
    manager = _three_tags(tmp_path)
    run_json = tmp_path / tag_for(3) / "run.json"
    run_json.write_bytes(record if isinstance(record, bytes) else record.encode())
    warnings = []
    assert manager.usable_tag(warn=warnings.append) == tag_for(2)
    assert warnings[0].startswith(f"warning: checkpoint {tag_for(3)} is damaged ({run_json}: unreadable (")
