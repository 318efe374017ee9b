"""The memory planner's terms against what the model and the loss actually allocate on CPU."""
from __future__ import annotations

import json
import re

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.lora import TARGET_MODULES as LORA_TARGET_MODULES
from gptneox.lora import LoraConfig, add_lora
from gptneox.memory_plan import (Batch, Hardware, LoraPlan, loss_buffer_bytes, parameter_counts,
                                 saved_activation_bytes_per_token, zero_plans)
from gptneox.dtypes import TORCH_DTYPES
from gptneox.flops import non_embedding_parameters
from gptneox.training.loss import masked_cross_entropy_from_hidden, with_rows
from gptneox.cli.plan_memory import main as plan_memory_main

from tests.helpers import TINY_CONFIG, run_main


def plan(*argv):
    """tools/plan_memory.py ARGV, in this process (it only computes and prints)."""
    return run_main(plan_memory_main, "plan_memory.py", *argv)


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
        kept = [t for t in node.saved_tensors
                if t is not None and t.data_ptr() != weight.data_ptr() and t.is_floating_point()]
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
    result = plan("--model", "stablelm-7b", "--gpus", "8", "--gpu_memory_gb",
                        "80", "--max_length", "4096", "--micro_batch", "4")
    assert result.returncode == 0, result.stderr
    peaks = re.search(r"peak, with checkpointing\s+([\d.]+) fits\s+([\d.]+) fits\s+([\d.]+) fits", result.stdout)
    assert peaks, result.stdout
    zero2, zero3, offload = map(float, peaks.groups())
    assert abs(zero2 - 44) / 44 < 0.15
    assert offload < zero3 < zero2
    assert "weights (16-bit, replicated)" in result.stdout and "checkpoint: optimizer partitions" in result.stdout


def test_a_20b_model_does_not_fit_on_one_node_under_zero2():
    result = plan("--model", "gpt-neox-20b", "--gpus", "8", "--gpu_memory_gb",
                        "80", "--max_length", "2048", "--micro_batch", "2", "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "ds_config: does not fit" in result.stdout
    assert "ds_config_zero3: fits" in result.stdout


def test_unknown_model_is_one_line():
    result = plan("--model", "gpt-neox-21b", "--gpus", "8", "--gpu_memory_gb",
                        "80", "--max_length", "2048", "--micro_batch", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "gpt-neox-21b" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--max_length", "0"], "argument --max_length: '0' must be above 0"),
    (["--gpus", "0"], "argument --gpus: '0' must be above 0"),
    (["--micro_batch", "0"], "argument --micro_batch: '0' must be above 0"),
    (["--gpu_memory_gb", "-5"], "argument --gpu_memory_gb: '-5' must be above 0"),
    (["--gpus_per_node", "3"], "--gpus_per_node 3 is more than --gpus 2 (the whole job's)"),
])
def test_sizes_that_plan_nothing_are_refused_naming_the_flag(flags, message):
    """Before, 0 read as "not given" (a TypeError), --gpus 0 divided by zero, negative memory was planned."""
    result = plan("--model", "pythia-160m", "--gpus", "2", "--gpu_memory_gb", "24", "--max_length", "64",
                  "--micro_batch", "1", *flags)
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr


def test_dtype_takes_both_spellings_as_every_tool_does():
    result = plan("--model", "pythia-160m", "--gpus", "1", "--gpu_memory_gb", "24", "--max_length", "64",
                  "--micro_batch", "1", "--dtype", "bfloat16", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(plan("--model", "pythia-160m", "--gpus", "1", "--gpu_memory_gb",
                                                        "24", "--max_length", "64", "--micro_batch", "1",
                                                        "--dtype", "bf16", "--json").stdout)


# LoRA. TINY_CONFIG by hand: hidden 48, MLP 96, 2 layers, vocabulary 96, 6 heads, untied; 47,232 parameters
# (embed_in and embed_out 4,608 each; per layer qkv 7,056, dense 2,352, dense_h_to_4h 4,704, dense_4h_to_h
# 4,656, LayerNorms 192; final LayerNorm 96).
TINY_PARAMETERS = 47_232


def test_lora_trainable_parameters_by_hand():
    config = GPTNeoXConfig(**TINY_CONFIG)
    assert parameter_counts(config, 0).total == TINY_PARAMETERS
    qkv = LoraPlan(r=4, target_modules=("query_key_value",), trained_token_rows=5).trainable_parameters(config)
    assert qkv == {"adapters": 2 * 4 * (48 + 144), "trained token rows": 2 * 5 * 48}  # 1,536 and 480
    every = LoraPlan(r=4, target_modules=LORA_TARGET_MODULES).trainable_parameters(config)
    assert every == {"adapters": 2 * 4 * ((48 + 144) + (48 + 48) + (48 + 96) + (96 + 48)), "trained token rows": 0}
    tied = GPTNeoXConfig(**{**TINY_CONFIG, "tie_word_embeddings": True})  # one matrix, one set of rows
    assert LoraPlan(r=4, trained_token_rows=5).trainable_parameters(tied)["trained token rows"] == 5 * 48


@pytest.mark.parametrize("gpus", [1, 2])
def test_lora_zero2_states_by_hand(gpus):
    """Frozen base in fp16 only; master, Adam, gradients and checkpoint over the 2,016 trained parameters."""
    config = GPTNeoXConfig(**TINY_CONFIG)
    lora = LoraPlan(r=4, target_modules=("query_key_value",), dropout=0.1, trained_token_rows=5)
    trained = 1_536 + 480
    plan, = zero_plans(config, Hardware(gpus, gpus, 80), Batch(1, 16, "fp16"),
                       {"zero2": {"stage": 2, "reduce_bucket_size": 1000}}, lora)
    assert plan.gpu_states == {"frozen base weights (16-bit, replicated)": 2 * TINY_PARAMETERS,
                               "adapters + trained token rows (16-bit)": 2 * trained,
                               "master weights (fp32)": 4 * trained / gpus,
                               "optimizer (Adam m, v)": 8 * trained / gpus,
                               "gradients (partition)": 2 * trained / gpus,
                               "reduce bucket": 2 * 1000}
    assert plan.gpu_step == {"fp32 gradient partition": 4 * trained / gpus}
    assert plan.disk == {"checkpoint: optimizer partitions (fp32 master, m, v)": 12 * trained,
                         "checkpoint: 16-bit module (trained parameters)": 2 * trained,
                         "final Hugging Face export": 2 * TINY_PARAMETERS, "final export: PEFT adapter": 2 * trained}
    full, = zero_plans(config, Hardware(gpus, gpus, 80), Batch(1, 16, "fp16"),
                       {"zero2": {"stage": 2, "reduce_bucket_size": 1000}})
    assert full.gpu_states["master weights (fp32)"] == 4 * TINY_PARAMETERS / gpus


@pytest.mark.parametrize("targets, dropout, block", [
    # full fine-tuning: input 48, LayerNorm outputs 2 x 48, qkv 144, attention output 48, MLP 2 x 96 (x 2 bytes)
    # + LayerNorm mean/rstd 2 x 2 x 4 + logsumexp 6 x 4
    (None, 0.0, 2 * (48 + 96 + 144 + 48 + 192) + 16 + 24),
    # frozen: input, qkv, attention output, up-projection always; + qkv's input (LN output) and its r=4 rows
    (("query_key_value",), 0.0, 2 * (48 + 144 + 48 + 96 + 48 + 4) + 16 + 24),
    # every target: + LN1 output, LN2 output, GELU output (dense reads the kept attention output), 4 x r
    (LORA_TARGET_MODULES, 0.0, 2 * (336 + 48 + 48 + 96 + 4 * 4) + 16 + 24),
    # dropout: each target keeps its dropped-out input instead, and a 1-byte mask of it
    (LORA_TARGET_MODULES, 0.1, 2 * (336 + 48 + 48 + 48 + 96 + 4 * 4) + (48 + 48 + 48 + 96) + 16 + 24),
])
def test_lora_saved_activations_by_hand(targets, dropout, block):
    config = GPTNeoXConfig(**TINY_CONFIG)
    lora = None if targets is None else LoraPlan(r=4, target_modules=targets, dropout=dropout)
    saved = saved_activation_bytes_per_token(config, "fp16", checkpointing=False, lora=lora)
    assert saved["blocks"] == 2 * block
    # checkpointing keeps each block's input only, LoRA or not
    assert saved_activation_bytes_per_token(config, "fp16", checkpointing=True, lora=lora)["blocks"] == 2 * 2 * 48


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("parallel_residual", [True, False])
@pytest.mark.parametrize("targets", [("query_key_value",), LORA_TARGET_MODULES])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_saved_activations_match_the_lora_model(dtype, parallel_residual, targets, dropout):
    """gptneox.lora.add_lora's model keeps what the planner says: exactly with trained token rows (the graph
    starts at the embedding), at most that without them (the first block keeps less)."""
    config = GPTNeoXConfig(**{**TINY_CONFIG, "use_parallel_residual": parallel_residual})
    batch, length = 3, 20
    input_ids = torch.randint(0, config.vocab_size, (batch, length))
    itemsize = TORCH_DTYPES[dtype].itemsize  # torch's CPU LayerNorm stats and dropout mask: the input dtype
    for token_ids in ([3, 5, 7], []):
        torch.manual_seed(0)
        model = GPTNeoX(config)
        add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets), token_ids)
        model = model.to(TORCH_DTYPES[dtype]).train()
        measured = saved_bytes(model, input_ids)
        per_token = saved_activation_bytes_per_token(
            config, dtype, checkpointing=False, layer_norm_stats_bytes=itemsize, dropout_mask_bytes=itemsize,
            lora=LoraPlan(4, targets, dropout, len(token_ids)))
        planned = sum(per_token.values()) * batch * length
        if token_ids:
            assert measured == planned
        else:  # less by part of the first block at most
            first_block = per_token["blocks"] / config.num_hidden_layers * batch * length
            assert planned - first_block < measured < planned


@pytest.mark.parametrize("token_ids", [[3, 5, 7], []])
def test_lora_head_buffers_match_what_the_loss_forms(token_ids):
    """With trained rows the loss projects onto a copy of the frozen weight with the rows in place and forms
    the gradient of those rows only; without them the head is frozen and no weight gradient is formed."""
    config = GPTNeoXConfig(**TINY_CONFIG)
    torch.manual_seed(0)
    model = GPTNeoX(config)
    add_lora(model, LoraConfig(r=4, alpha=8), token_ids)
    tokens = 40
    hidden = torch.randn(1, tokens, config.hidden_size, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (1, tokens))
    kept = {}

    def head(h, weight, trained_rows=None):
        kept["head"] = with_rows(weight, trained_rows)
        return masked_cross_entropy_from_hidden(h, weight, targets, torch.ones_like(targets, dtype=torch.bool),
                                                chunk_rows=8, trained_rows=trained_rows)

    total, _ = model.embed_out(hidden, head=head)
    weight_gradient = total.grad_fn.gradients[1]
    planned = loss_buffer_bytes(config, "fp32", tokens, chunk_rows=8, lora=LoraPlan(4, trained_token_rows=len(token_ids)))
    assert "head weight gradient (fp32 + cast)" not in planned
    if token_ids:
        assert kept["head"].data_ptr() != model.embed_out.weight.data_ptr()  # a copy with the rows in place
        assert planned["head weight with the trained rows in place"] == kept["head"].nbytes
        assert planned["trained head rows' gradient (fp32 + cast)"] == weight_gradient.nbytes == 3 * 48 * 4
    else:
        assert weight_gradient is None and "trained head rows' gradient (fp32 + cast)" not in planned
        assert "head weight with the trained rows in place" not in planned


def plan_stablelm_7b(*extra: str):
    result = plan("--model", "stablelm-7b", "--gpus", "1", "--gpu_memory_gb",
                        "24", "--max_length", "2048", "--micro_batch", "1", *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stablelm_7b_trains_with_lora_on_one_24_gb_gpu():
    """Full fine-tuning needs 16 bytes a parameter (126 GB); LoRA keeps 2 (15.7 GB) and fits with checkpointing."""
    full = plan_stablelm_7b()
    assert "ds_config: does not fit" in full
    lora = plan_stablelm_7b("--lora_r", "16")
    assert "ds_config: fits with gradient checkpointing only" in lora
    assert re.search(r"frozen base weights \(16-bit, replicated\)\s+15\.7\d", lora), lora
    assert "adapters 6,291,456, trained token rows 61,440" in lora  # 16 layers x 16 x (6144 + 18432); 2 x 5 x 6144
    every = plan_stablelm_7b("--lora_r", "16", "--lora_target_modules", "all-linear")
    assert "query_key_value, dense, dense_h_to_4h, dense_4h_to_h" in every


@pytest.mark.parametrize("flag, value, named", [
    ("--lora_r", "-1", "--lora_r -1"),
    ("--lora_dropout", "1", "--lora_dropout 1"),
    ("--lora_target_modules", "query_key_value,mlp", "'mlp': GPT-NeoX's targets are query_key_value, dense, "
                                                     "dense_h_to_4h, dense_4h_to_h or all-linear"),
])
def test_bad_lora_settings_are_one_line(flag, value, named):
    result = plan("--model", "stablelm-7b", "--gpus", "1", "--gpu_memory_gb",
                        "24", "--max_length", "2048", "--micro_batch", "1", "--lora_r", "16", flag, value)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and named in result.stderr, result.stderr


def test_the_readme_lora_figures_for_sft7_on_one_gpu():
    """The bundled `lora` section from --configs; the README's smallest GPUs for the SFT-7 data."""
    sft7 = ["--configs", "defaults", "stablelm-7b", "oasst-mix", "lora", "--gpus", "1"]
    recipe = plan(*sft7, "--gpu_memory_gb", "32")
    assert recipe.returncode == 0, recipe.stderr
    assert "LoRA r 16 on query_key_value, dense, dense_h_to_4h, dense_4h_to_h, dropout 0.05" in recipe.stdout
    assert re.search(r"peak, with checkpointing\s+27\.1\d fits", recipe.stdout), recipe.stdout
    one = plan(*sft7, "--gpu_memory_gb", "24", "--per_device_train_batch_size", "1")
    assert re.search(r"peak, with checkpointing\s+20\.38 fits\s+19\.43 fits", one.stdout), one.stdout
    assert "ds_config: fits with gradient checkpointing only" in one.stdout
