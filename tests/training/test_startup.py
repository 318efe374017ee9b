"""Start-up: DeepSpeed's JIT-built communication op is cached per environment, and a first build is announced."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from deepspeed.accelerator import get_accelerator

from gptneox.training import distributed


def test_the_extension_cache_defaults_to_this_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    distributed.use_environment_extensions_dir()
    assert sys.prefix != sys.base_prefix, "the tests run in a virtual environment"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    distributed.use_environment_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


@pytest.mark.skipif(get_accelerator().device_name() != "cpu",
                    reason="DeepSpeed builds the shared-memory op for its CPU accelerator only")
def test_a_first_build_is_announced_and_a_built_op_is_not(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    line = distributed.announce_comm_op_build()
    assert line is not None and f"in {tmp_path / 'deepspeed_shm_comm'} (first start in this environment" in line
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    assert distributed.announce_comm_op_build() is None
