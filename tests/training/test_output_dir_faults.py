"""Output-directory faults on real runs of the tiny config: a run killed before its first save leaves a
directory that the same command goes on into; a full disk while writing the lock is one line and leaves no
lock; a directory the run reads from, or that holds someone's model, is never written over or deleted."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptneox.errors import invoked_name
from gptneox.training.output_dir import LOCK_NAME, previous_run

from tests.helpers import LAUNCH_VARIABLES, REPO
from tests.training.runs import SAMPLE, read_metrics, run_train, script_argv

SHORT = ("--max_steps", "4", "--save_steps", "2", "--eval_steps", "100")
# Holds the first optimizer step until the test kills the process: the set-up is written, nothing is saved.
HELD_AT_FIRST_STEP = """
import os, runpy, sys, time
from gptneox.training import loop
def held(*args, **kwargs):
    open(os.environ["MARKER"], "w").close()
    time.sleep(600)
loop.train_step = held
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_run_killed_before_its_first_save_is_gone_on_with_by_the_same_command(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    marker = tmp_path / "at_first_step"
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environment["MARKER"] = str(marker)
    process = subprocess.Popen([sys.executable, "-c", HELD_AT_FIRST_STEP, *script_argv(workspace, out, *SHORT)],
                               cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run did not reach its first step: " + process.communicate()[1][-3000:])
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)  # a crash: no handler runs, the lock file stays
    process.wait(timeout=60)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert {"train_config.yaml", "ds_config.resolved.json", LOCK_NAME, "checkpoints/model/config.json"} <= set(left)
    assert not any(name.startswith("checkpoints/step") for name in left) and previous_run(out) == []

    assert run_train(workspace, out, *SHORT) == 0  # the same command goes on into it
    captured = capsys.readouterr()
    assert "holds another run" not in captured.err
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / "model.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_a_full_disk_while_writing_the_lock_is_one_line_and_leaves_no_lock(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the first write of the run is the lock's
    assert run_train(workspace, out, *SHORT) == 2
    error = capsys.readouterr().err
    assert error == (f"{invoked_name()}: error: no space left on device while writing the lock file "
                     f"{out / LOCK_NAME}: free some space in output_dir, then run the same command again\n")
    assert not out.exists()  # no empty lock file, and the directory this run made is gone again
    monkeypatch.undo()
    assert run_train(workspace, out, *SHORT) == 0  # once there is space, the same command runs


@pytest.fixture
def pretrained(workspace, tmp_path_factory):
    """A model directory as one is downloaded: config, weights and tokenizer files, no run records (made from
    the export of a short tiny run, so that a run can fine-tune it)."""
    finished = tmp_path_factory.mktemp("finished")
    assert run_train(workspace, finished, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "100") == 0
    model = tmp_path_factory.mktemp("pretrained")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        if (finished / name).is_file():
            shutil.copy(finished / name, model / name)
    return model


@pytest.mark.slow
def test_the_input_is_never_an_output_dir_and_never_deleted(workspace, pretrained, tmp_path, capsys):
    before = _files(pretrained)
    assert {p.name for p in before} >= {"config.json", "model.safetensors", "tokenizer.json"}

    def refused(*argv) -> str:
        capsys.readouterr()
        assert run_train(workspace, *argv) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "--overwrite_output_dir" not in error, error
        return error

    # the model being fine-tuned, with or without --overwrite_output_dir
    for flags in ((), ("--overwrite_output_dir",)):
        error = refused(pretrained, *SHORT, "--model_name", str(pretrained), *flags)
        assert f"output_dir {pretrained} is the directory that model_name is read from" in error
    # the tokenizer's folder, a dataset file's folder, cache_dir
    tokenizers = tmp_path / "tokenizers"
    tokenizers.mkdir()
    shutil.copy(SAMPLE / "tokenizer.json", tokenizers / "tokenizer.json")
    error = refused(tokenizers, *SHORT, "--tokenizer_path", str(tokenizers / "tokenizer.json"),
                    "--overwrite_output_dir")
    assert f"output_dir {tokenizers} is the directory that tokenizer_path is read from" in error
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE / "vicuna_sample.json", data / "vicuna_sample.json")
    vicuna = json.dumps([{"vicuna": {"input_file_path": str(data / "vicuna_sample.json"), "val_split": 0.2}}])
    error = refused(data, *SHORT, "--datasets", vicuna, "--overwrite_output_dir")
    assert f"output_dir {data} is the directory that dataset vicuna (vicuna_sample.json) is read from" in error
    error = refused(tmp_path, *SHORT, "--cache_dir", str(tmp_path), "--overwrite_output_dir")
    assert f"output_dir {tmp_path} is the directory that cache_dir is read from" in error
    # a model that is not this run's input, and no run's output either: not "another run", and not deletable
    for flags in ((), ("--overwrite_output_dir",)):
        error = refused(pretrained, *SHORT, *flags)
        assert (f"output_dir {pretrained} holds a model that no run wrote (config.json, model.safetensors)"
                ": the final export would replace it; choose another output_dir") in error
    assert _files(pretrained) == before and (tokenizers / "tokenizer.json").is_file()
    assert (data / "vicuna_sample.json").is_file()

    # an output_dir below the model fine-tunes it; --overwrite_output_dir then deletes that run's files only
    below = pretrained / "finetuned"
    assert run_train(workspace, below, *SHORT, "--model_name", str(pretrained)) == 0
    (below / "notes.txt").write_text("mine")
    assert run_train(workspace, below, *SHORT, "--model_name", str(pretrained), "--overwrite_output_dir") == 0
    assert (below / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in read_metrics(below) if "loss" in r] == [1, 2, 3, 4]
    assert {p: b for p, b in _files(pretrained).items() if below not in p.parents} == before
