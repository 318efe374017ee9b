"""Checkpoint files that cannot run code: every `.pt` file of a tag is read by torch's weights-only
unpickler before DeepSpeed (which loads with `weights_only=False`) sees it.

A `.pt` file is a pickle, and a pickle may call any function it names while it is read: a checkpoint from
someone else could run anything on `--resume` or `tools/export_hf.py`. The weights-only unpickler builds
tensors, containers and plain values only, plus the types allowed here: exactly those DeepSpeed 0.19's
ZeRO-2 and ZeRO-3 checkpoints (fp32, fp16, bf16) and our own client state (numpy's random state) hold.
A file that names anything else is refused in one line naming the file and the type; `trust_checkpoint_code`
lets a checkpoint the user trusts through unchecked.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from gptneox.errors import UserError

_reconstruct = np._core.multiarray._reconstruct
# What the files hold besides tensors: the loss scaler, the ZeRO stage and the parameter fragments of the
# optimizer state (DeepSpeed), numpy's random state (ours: an array of a uint32 dtype). numpy 1 pickled
# _reconstruct under numpy.core, numpy 2 under numpy._core.
ALLOWED_TYPES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, np.ndarray, np.dtype,
                 type(np.dtype(np.uint32)), _reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct")]
TRUST_HINT = ("code in a checkpoint file runs when it is loaded; if you trust whoever wrote it, pass "
              "--trust_checkpoint_code true")


class UnsafeCheckpointError(UserError):
    """A checkpoint file that needs more than tensors and the allowed types to load."""


def check_no_code(tag_dir: str | Path, trust: bool = False) -> None:
    """Read every `.pt` file of a checkpoint tag weights-only (tensors memory-mapped, not read); refuse the
    first that names a type outside ALLOWED_TYPES, naming the file and the type. Nothing with `trust`."""
    if trust:
        return
    for path in sorted(Path(tag_dir).glob("*.pt")):
        with torch.serialization.safe_globals(ALLOWED_TYPES):
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            if unsafe:
                raise UnsafeCheckpointError(f"{path}: refused to load: it needs {', '.join(unsafe)}, which no "
                                            f"DeepSpeed checkpoint holds; {TRUST_HINT}")
            try:  # what the scan of its names cannot see (instructions the weights-only reader refuses)
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:
                lines = str(err).strip().splitlines()
                reason = next((line.partition(":")[2].strip() for line in lines
                               if line.startswith("WeightsUnpickler error")), lines[0])
                raise UnsafeCheckpointError(f"{path}: refused to load: {reason}; {TRUST_HINT}") from None
