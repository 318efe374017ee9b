"""The torch releases gptneox runs on, and the paths that depend on the release.

GPU nodes come with the torch of their CUDA image, not the one `constraints.txt` pins for CPU machines, so
each API that only newer releases have either has a fallback or is refused in one line when it is chosen:

- torch >= 2.5 (the floor, declared in pyproject): FlexAttention with `create_block_mask(..., device=)`,
  torch's fused AdamW on CPU (2.4), `nn.Module.compile` (2.2), the weights-only unpickler's allow-list.
- torch >= 2.10: `torch.nn.attention.varlen.varlen_attn`, torch's own varlen flash kernel, for packed rows on
  CUDA in fp16/bf16; older releases run packed rows as one SDPA call per segment (same results, slower).
"""
from __future__ import annotations

import torch

from gptneox.errors import UserError

MINIMUM = (2, 5)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch ("2.11.0+cu130" -> (2, 11))."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_version() -> None:
    """Refuse a torch older than MINIMUM in one line, before any of its missing APIs is reached."""
    if torch_version() < MINIMUM:
        raise UserError(f"torch {torch.__version__} is older than {'.'.join(map(str, MINIMUM))}, the oldest release "
                        "gptneox runs on (FlexAttention, the weights-only checkpoint loader); install a newer torch")


def version_dependent_paths() -> dict[str, str]:
    """Which path each release-dependent feature takes with this torch: what bench/gpu_check.sh prints."""
    from gptneox.attention import _torch_varlen
    varlen = _torch_varlen()
    if varlen is None:
        packed = "one SDPA call per segment (torch.nn.attention.varlen needs torch >= 2.10)"
    else:
        packed = f"torch varlen_attn ({', '.join(varlen[1])}) on CUDA fp16/bf16, SDPA per segment otherwise"
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "packed rows (sdpa)": packed,
            "flex": f"torch.compile(flex_attention, dynamic=False) on CUDA, widths bucketed; dynamo.{limit}",
            "compile: true": "nn.Module.compile per block"}
