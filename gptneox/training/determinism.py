"""`deterministic: true`: the same losses bit for bit on a GPU after a resume, at some cost in speed.

On CPU the loop is deterministic already. On CUDA, fused attention backward passes (flash-attn, SDPA's
memory-efficient kernel) and cuBLAS's split-K reductions add in a varying order. This switches torch to its
deterministic algorithms, which gptneox.attention also reads to ask flash-attn for its deterministic
backward, and gives cuBLAS a fixed workspace (it must be set before the first CUDA matmul: call this first).
"""
from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_algorithms(enabled: bool) -> None:
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
