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

from tests.helpers import LAUNCH_VARIABLES, REPO


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
