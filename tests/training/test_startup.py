"""Start-up: training needs no DeepSpeed communication op (tests/training/test_partitioned.py checks that two
ranks leave nothing in /dev/shm), DeepSpeed's JIT ops are cached per environment, and one process prints none
of DeepSpeed's noise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptneox.training import distributed, noise

from tests.helpers import LAUNCH_VARIABLES, REPO, run_python


def test_the_extension_cache_defaults_to_this_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    distributed.use_environment_extensions_dir()
    assert sys.prefix != sys.base_prefix, "the tests run in a virtual environment"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    distributed.use_environment_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


@pytest.mark.slow
def test_a_single_process_run_builds_no_op_and_prints_no_noise(tmp_path):
    """A first start in an empty extension cache, as on a fresh machine, with DeepSpeed left to detect the
    accelerator (no DS_ACCELERATOR): nothing is built, none of the known noise shows, a real warning does."""
    environment = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARIABLES, "DS_ACCELERATOR")}
    environment.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "train.py", "--configs", "defaults", "tiny", "sample-mix", "--output_dir",
                           str(tmp_path / "run"), "--max_steps", "3", "--eval_steps", "3"],
                          cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr  # one process: nothing interleaves
    for message in (noise.SCHEDULER_NOT_STARTED, noise.NO_ACCELERATOR_FOUND, "shm_comm", "FutureWarning",
                    "DeprecationWarning", "UserWarning"):
        assert message not in output, message
    assert "total_num_steps 3 is less than warmup_num_steps 10" in output  # tiny's warm-up is 10 steps
    assert not (tmp_path / "extensions").exists()


GROUP_LIFETIMES = """
import torch.distributed as dist
from gptneox.errors import UserError
from gptneox.training.distributed import init_distributed, process_group_of_this_run

def ends(error):
    try:
        with process_group_of_this_run(raised_together=(UserError,)) as (rank, world):
            assert dist.is_initialized() and (rank, world) == (0, 1)
            if error is not None:
                raise error
    except (UserError, RuntimeError):
        pass
    alive = dist.is_initialized()
    if alive:
        dist.destroy_process_group()
    return alive

print(ends(None), ends(UserError("refused")), ends(RuntimeError("a bug")))
init_distributed()
with process_group_of_this_run(raised_together=(UserError,)):
    pass
print(dist.is_initialized())
"""


@pytest.mark.slow
def test_a_run_destroys_the_process_group_it_started_unless_a_bug_ended_it():
    """A group left alive at exit can end a finished rank with "terminate called without an active exception"
    (the launcher then reports a failure): a run destroys the group it started after a normal end or an error
    every rank raises together; after a bug it leaves it (destroying could wait for a rank that never comes),
    and a group someone else started stays theirs."""
    done = run_python("-c", GROUP_LIFETIMES)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False", "True", "True"], done.stdout
