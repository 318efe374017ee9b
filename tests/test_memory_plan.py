"""The memory planner's terms against what the model and the loss actually allocate on CPU."""
from __future__ import annotations

import re

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.memory_plan import loss_buffer_bytes, parameter_counts, saved_activation_bytes_per_token
from gptneox.dtypes import TORCH_DTYPES
from gptneox.flops import non_embedding_parameters
from gptneox.training.loss import masked_cross_entropy_from_hidden

from tests.helpers import REPO, TINY_CONFIG, run_python


def saved_bytes(model: GPTNeoX, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, return_hidden=True)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("parallel_residual", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_saved_activations_per_token_match_the_model(dtype, parallel_residual, checkpointing):
    config = GPTNeoXConfig(**{**TINY_CONFIG, "use_parallel_residual": parallel_residual})
    torch.manual_seed(0)
    model = GPTNeoX(config).to(TORCH_DTYPES[dtype]).train()
    model.gradient_checkpointing = checkpointing
    batch, length = 3, 20  # tokens != hidden size, so no two shapes coincide by accident
    measured = saved_bytes(model, torch.randint(0, config.vocab_size, (batch, length)))
    # torch's CPU LayerNorm keeps mean/rstd in the input dtype (CUDA, which the planner assumes: fp32)
    planned = sum(saved_activation_bytes_per_token(config, dtype, checkpointing,
                                                   layer_norm_stats_bytes=TORCH_DTYPES[dtype].itemsize
                                                   ).values())
    if checkpointing:  # cos/sin are kept as the blocks' recompute arguments, which the hooks do not see
        measured += 2 * (config.rotary_ndims // 2) * TORCH_DTYPES[dtype].itemsize * batch * length
    assert measured == planned * batch * length


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_loss_buffers_match_what_the_chunked_loss_keeps(dtype):
    config = GPTNeoXConfig(**TINY_CONFIG)
    torch_dtype = TORCH_DTYPES[dtype]
    tokens = 40
    hidden = torch.randn(2, tokens // 2, config.hidden_size, dtype=torch_dtype, requires_grad=True)
    weight = torch.randn(config.vocab_size, config.hidden_size, dtype=torch_dtype, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (2, tokens // 2))
    total, _ = masked_cross_entropy_from_hidden(hidden, weight, targets, torch.ones_like(targets, dtype=torch.bool),
                                                chunk_rows=8)
    node = total.grad_fn
    if dtype == "fp16":  # recomputes in backward: keeps the trained rows, builds the gradients later
        kept = [t for t in node.saved_tensors if t.data_ptr() != weight.data_ptr() and t.is_floating_point()]
        rows_kept = sum(t.nbytes for t in kept)
        assert rows_kept == tokens * config.hidden_size * 2
    else:
        grad_hidden, grad_weight = node.gradients
        assert grad_weight.dtype == torch.float32
        rows_kept = grad_hidden.nbytes
        assert grad_weight.nbytes == config.vocab_size * config.hidden_size * 4
    planned = loss_buffer_bytes(config, dtype, tokens, chunk_rows=8)
    # the rows term counts the kept rows and, under fp16, the gradient built from them in backward
    assert planned["trained hidden rows and their gradient"] == rows_kept * (2 if dtype == "fp16" else 1)


@pytest.mark.parametrize("name", ["tiny", "pythia-12b", "gpt-neox-20b"])
def test_parameter_counts_are_the_models(name):
    config = GPTNeoXConfig.from_name(name)
    with torch.device("meta"):
        model = GPTNeoX(config)
    counts = parameter_counts(config, persistence_threshold=10 * config.hidden_size)
    assert counts.total == sum(p.numel() for p in model.parameters())
    # against the closed form of gptneox.flops, which does not build a model
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert counts.total == non_embedding_parameters(config) + config.vocab_size * config.hidden_size + head
    block = sum(p.numel() for p in model.gpt_neox.layers[0].parameters())
    assert counts.largest_block == max(block, config.vocab_size * config.hidden_size)
    assert counts.persistent == sum(p.numel() for p in model.parameters() if p.dim() == 1)  # biases, LayerNorms


def test_stablelm_7b_on_8_gpus_matches_the_hand_estimate():
    """Issue 12's estimate for the SFT-7 recipe: about 44 GB per GPU under ZeRO-2 (with checkpointing)."""
    result = run_python(REPO / "tools/plan_memory.py", "--model", "stablelm-7b", "--gpus", "8", "--gpu_memory_gb",
                        "80", "--max_length", "4096", "--micro_batch", "4")
    assert result.returncode == 0, result.stderr
    peaks = re.search(r"peak, with checkpointing\s+([\d.]+) fits\s+([\d.]+) fits\s+([\d.]+) fits", result.stdout)
    assert peaks, result.stdout
    zero2, zero3, offload = map(float, peaks.groups())
    assert abs(zero2 - 44) / 44 < 0.15
    assert offload < zero3 < zero2
    assert "weights (16-bit, replicated)" in result.stdout and "checkpoint: optimizer partitions" in result.stdout


def test_a_20b_model_does_not_fit_on_one_node_under_zero2():
    result = run_python(REPO / "tools/plan_memory.py", "--model", "gpt-neox-20b", "--gpus", "8", "--gpu_memory_gb",
                        "80", "--max_length", "2048", "--micro_batch", "2", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "ds_config: does not fit" in result.stdout
    assert "ds_config_zero3: fits" in result.stdout


def test_unknown_model_is_one_line():
    result = run_python(REPO / "tools/plan_memory.py", "--model", "gpt-neox-21b", "--gpus", "8", "--gpu_memory_gb",
                        "80", "--max_length", "2048", "--micro_batch", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "gpt-neox-21b" in result.stderr
