"""ZeRO-3: the model built straight into its partitions, and pretrained weights streamed into them.

Under `deepspeed.zero.Init` each module's parameters are cut into one slice per rank as soon as the module
is constructed, so no rank ever holds the whole model. DeepSpeed wraps `Module.apply` inside that context:
GPTNeoX's own initialisation (`self.apply(self._init_weights)`) gathers one module at a time, every rank
draws the same random numbers, and rank 0's values are kept; with the same seed the weights are those of
an unpartitioned model. Pretrained weights are then read on rank 0 only, one tensor at a time, and each
parameter is gathered just while rank 0 writes it (`GatheredParameters(modifier_rank=0)` broadcasts it and
partitions it again), so host memory holds one tensor of the checkpoint at a time.
"""
from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.model import copy_rows, state_dict_shapes
from gptneox.training.distributed import is_distributed
from gptneox.weights import CheckpointReader


def zero_stage(ds_config: dict) -> int:
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def parameter_shape(parameter: torch.Tensor) -> torch.Size:
    """The whole parameter's shape, also for a ZeRO-3 parameter (whose data is this rank's slice or empty)."""
    return getattr(parameter, "ds_shape", parameter.shape)


def build_partitioned(config: GPTNeoXConfig, ds_config: dict) -> GPTNeoX:
    """A randomly initialised GPTNeoX whose parameters are ZeRO-3 partitions, in the ds_config's dtype."""
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return GPTNeoX(config)


def load_partitioned(model: GPTNeoX, path: str | Path, checkpoint_config: GPTNeoXConfig) -> None:
    """Overwrite the partitioned `model` with the weights of the Hugging Face directory `path`, whose
    config.json is `checkpoint_config`. The model's vocabulary may be larger: its extra rows start at the
    mean of the stored rows (gptneox.model.copy_rows, as GPTNeoX.resize_token_embeddings). Collective."""
    reader = CheckpointReader(path, state_dict_shapes(checkpoint_config),  # every rank checks
                              checkpoint_config.tie_word_embeddings)
    dtype = next(model.parameters()).dtype
    reading = not is_distributed() or torch.distributed.get_rank() == 0
    stream = reader.tensors(dtype) if reading else ((name, None) for name in reader.names)
    for name, tensor in stream:
        parameter = model.get_parameter(name)
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if tensor is not None:
                copy_rows(parameter.data, tensor)
