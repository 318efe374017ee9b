"""deterministic: true switches torch to deterministic algorithms and gives cuBLAS a fixed workspace."""
from __future__ import annotations

import os

import torch

from gptneox.training.determinism import use_deterministic_algorithms


def test_deterministic_switches_torch_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        from gptneox.attention import _deterministic
        assert _deterministic()  # what the flash kernels are asked for
    finally:
        torch.use_deterministic_algorithms(False)
