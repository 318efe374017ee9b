"""Each kind of fault on a real run of the tiny config: a rerun into a finished directory, a resume that
does not match, a full disk while saving and while exporting, a stop during evaluation, and (two ranks)
the `deepspeed` command killed under its ranks."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from safetensors.torch import load_file

from gptneox import weights
from gptneox.data import load_tokenizer
from gptneox.errors import invoked_name
from gptneox.training.checkpoint import POINTER, tag_for
from gptneox.training.distributed import free_port
from gptneox.training.evaluation import EvaluationStopped, Evaluator, evaluate

from tests.helpers import LAUNCH_VARIABLES, REPO
from tests.training.runs import SAMPLE, read_metrics, run_train, script_argv

SHORT = ("--max_steps", "4", "--save_steps", "2", "--eval_steps", "100")


def test_a_rerun_into_a_finished_directory_is_refused_and_overwrite_starts_over(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(workspace, out, *SHORT) == 0
    first = load_file(out / "model.safetensors")
    capsys.readouterr()
    assert run_train(workspace, out, *SHORT, "--learning_rate", "0.01", "--rng_seed", "5") == 2
    error = capsys.readouterr().err
    assert f"output_dir {out} holds another run (checkpoints, metrics.jsonl" in error
    assert "--resume" in error and "--overwrite_output_dir" in error and error.count("\n") == 1
    assert all(torch.equal(first[k], v) for k, v in load_file(out / "model.safetensors").items())

    assert run_train(workspace, out, *SHORT, "--learning_rate", "0.01", "--rng_seed", "5",
                     "--overwrite_output_dir") == 0
    second = load_file(out / "model.safetensors")
    assert not all(torch.equal(first[k], v) for k, v in second.items())  # the new run's weights
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]  # only the new run's
    assert not (out / "train.lock").exists()


def test_a_resume_that_does_not_match_is_refused_before_anything_is_written(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(workspace, out, *SHORT) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for change, named in [(("--model_name", "pythia-70m"), "with hidden_size=64, ... this run has hidden_size=512"),
                          (("--learning_rate", "0.5"), "learning_rate=0.002, this run has learning_rate=0.5"),
                          (("--max_length", "32"), "max_length=64, this run has max_length=32")]:
        assert run_train(workspace, out, *SHORT, "--resume", *change) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"{invoked_name()}: error: resume: {out / 'checkpoints' / tag_for(4)} was written with")
        for part in named.split(" ... "):
            assert part in error, error
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten
    # an intended change goes through, and says so
    assert run_train(workspace, out, "--max_steps", "6", "--save_steps", "2", "--eval_steps", "100",
                     "--resume", "--allow_changed", "total_steps") == 0
    assert "resume: total_steps changed from total_steps=4 to total_steps=6" in capsys.readouterr().out


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_exits_non_zero(workspace, tmp_path, monkeypatch,
                                                                                 capsys):
    out = tmp_path / "run"
    real_save = TorchCheckpointEngine.save

    def fills_the_disk_at_step_4(engine, state_dict, path):
        if tag_for(4) in str(path) and "optim_states" in str(path):
            Path(path).write_bytes(b"PK\x03\x04 a partial zip")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(engine, state_dict, path)

    monkeypatch.setattr(TorchCheckpointEngine, "save", fills_the_disk_at_step_4)
    assert run_train(workspace, out, *SHORT) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar's lines
    assert error == (f"{invoked_name()}: error: no space left on device while saving checkpoint {tag_for(4)} in "
                     f"{out / 'checkpoints'}; the previous checkpoint {out / 'checkpoints' / tag_for(2)} is intact; "
                     f"the partial {tag_for(4)} was removed")
    assert not (out / "checkpoints" / tag_for(4)).exists()
    assert json.loads((out / "checkpoints" / POINTER).read_text())["complete"] == [tag_for(2)]
    monkeypatch.setattr(TorchCheckpointEngine, "save", real_save)
    assert run_train(workspace, out, *SHORT, "--resume") == 0  # once there is space, the run goes on
    assert (out / "model.safetensors").is_file()


def test_disk_full_while_exporting_leaves_no_partial_model(workspace, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def no_space(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(weights, "save_file", no_space)
    assert run_train(workspace, out, *SHORT) == 2
    error = capsys.readouterr().err
    assert (f"no space left on device while exporting {out / 'checkpoints' / tag_for(4)} to {out}; the checkpoint "
            "is intact: free some space, then run python tools/export_hf.py") in error
    assert not list(out.glob("model*.safetensors")) and not (out / ".export.partial").exists()
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(4)


class _Engine:
    """Just enough of an engine for evaluate(): a forward pass over a batch here would fail the test."""

    device = torch.device("cpu")

    class module:
        training = True

    def eval(self):
        pass

    def train(self, mode):
        assert mode is True

    def __call__(self, input_ids, **kwargs):
        # a round without a batch runs a one-token stand-in forward (ZeRO-3's gathers); a batch must not run
        assert input_ids.shape == (1, 1), "a batch was evaluated after the stop"


def test_a_stop_during_evaluation_ends_it_at_the_next_batch():
    answers = iter([False, True])
    with pytest.raises(EvaluationStopped):
        evaluate(_Engine(), [None, {"input_ids": torch.ones(1, 4)}], stopped=lambda: next(answers))
    # every rank gets as many rounds (None where it has no batch), so each asks the stop collective as often
    sets = {"a": list(range(7))}
    tokenizer = load_tokenizer(SAMPLE / "tokenizer.json")
    rounds = [Evaluator(sets, tokenizer, max_length=8, batch_size=2, every=1, rank=rank, world=3).my_batches(sets["a"])
              for rank in range(3)]
    assert rounds == [[[0, 1], [6]], [[2, 3], None], [[4, 5], None]]


@pytest.mark.slow
def test_killing_the_deepspeed_command_stops_its_ranks_after_a_save(workspace, tmp_path):
    """DeepSpeed's single-node runner forwards no signal and dies at once; its ranks notice, save, and exit 75.
    Each rank's exit status is written by a wrapper to its own file."""
    out = tmp_path / "run"
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environment["ROBUST_STATUS_DIR"] = str(tmp_path)
    wrapper = tmp_path / "rank.py"
    wrapper.write_text("import os, runpy, sys\n"
                       "sys.argv = [sys.argv[0]] + sys.argv[1:]\n"
                       "code = 1\n"
                       "try:\n"
                       "    runpy.run_path(os.path.join(os.getcwd(), 'train.py'), run_name='__main__')\n"
                       "except SystemExit as stop:\n"
                       "    code = stop.code\n"
                       "finally:\n"
                       "    path = os.path.join(os.environ['ROBUST_STATUS_DIR'], f\"rank{os.environ['RANK']}.status\")\n"
                       "    open(path, 'w').write(str(code))\n"
                       "sys.exit(code)\n")
    argv = script_argv(workspace, out, "--max_steps", "100000", "--save_steps", "100000", "--eval_steps", "100000",
                        "--per_device_train_batch_size", "1")[1:]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
               str(wrapper), *argv]
    runner = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert runner.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=60)
    statuses = [tmp_path / f"rank{rank}.status" for rank in range(2)]
    deadline = time.monotonic() + 180
    while not all(s.is_file() for s in statuses):
        if time.monotonic() > deadline:
            os.killpg(runner.pid, signal.SIGKILL)
            pytest.fail("the ranks went on training after the deepspeed command died")
        time.sleep(0.2)
    assert [s.read_text() for s in statuses] == ["75", "75"]
    latest = json.loads((out / "checkpoints" / POINTER).read_text())["latest"]
    assert latest == tag_for(read_metrics(out)[-1]["step"])
