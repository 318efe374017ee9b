"""Names of the floating-point precisions, and their torch dtypes: one table for training, export,
loading, the tools and the benchmarks.

The short names (fp32, fp16, bf16) are the training config's; torch's long names (float32, float16,
bfloat16) are accepted wherever a name is read, and mean the same.
"""
from __future__ import annotations

import torch

from gptneox.errors import UserError

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LONG_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DTYPE_NAMES = (*TORCH_DTYPES, *LONG_NAMES)  # every accepted spelling, short ones first
DTYPE_HELP = "fp32, fp16 or bf16 (float32, float16, bfloat16 mean the same)"


class DtypeError(UserError, ValueError):
    """A precision name that is not in the table."""


def dtype_name(name: str) -> str:
    """The short name of a precision given in either spelling."""
    short = LONG_NAMES.get(name, name)
    if short not in TORCH_DTYPES:
        raise DtypeError(f"dtype={name!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return short


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[dtype_name(name)]
