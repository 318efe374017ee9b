"""From `model_name` to a model ready for deepspeed.initialize: its shape and vocabulary size, weights
(partitioned under ZeRO-3), attention backend, gradient checkpointing, compiled blocks, and the two
weight-decay parameter groups.
"""
from __future__ import annotations

import dataclasses
import os

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from tokenizers import Tokenizer

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.attention import AttentionBackendError, check_backend
from gptneox.dtypes import torch_dtype
from gptneox.flops import non_embedding_parameters
from gptneox.lora import add_lora
from gptneox.sizes import VOCAB_MULTIPLE, round_up
from gptneox.training.config import TrainConfig, TrainConfigError
from gptneox.training.model_files import find_model_dir
from gptneox.training.partitioned import build_partitioned, load_partitioned, parameter_shape, zero_stage
from gptneox.weights import check_config_fits_weights


def training_model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> GPTNeoXConfig:
    """The shape of the model to train, known before any weight is read: the preset or the directory's
    config.json, with the vocabulary grown to fit the tokenizer (never shrunk: StableLM's 50432 rows stay)."""
    model_dir = find_model_dir(cfg.model_name, cfg.cache_dir)
    config = GPTNeoXConfig.from_name(cfg.model_name) if model_dir is None else GPTNeoXConfig.from_hf(model_dir)
    if model_dir is not None:
        check_config_fits_weights(config, model_dir)
    rows = round_up(tokenizer.get_vocab_size(), VOCAB_MULTIPLE)
    return dataclasses.replace(config, vocab_size=max(rows, config.vocab_size))


def total_memory_bytes(device_type: str) -> tuple[int, str]:
    """The memory of the device a rank builds its model on, and its name: the GPU's, or the host's RAM."""
    if device_type == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        return properties.total_memory, f"the {properties.name}'s"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"


def check_model_fits(config: GPTNeoXConfig, dtype: str, partitions: int, memory: tuple[int, str]) -> None:
    """Refuse, before anything is built, a model whose weights alone (in the training dtype, cut in
    `partitions` under ZeRO-3) outgrow the memory a rank builds them in (total_memory_bytes): a lower bound,
    since training needs several times more, so a model that passes may still not fit, one refused cannot."""
    parameters = non_embedding_parameters(config) + (1 if config.tie_word_embeddings else 2) * \
        config.vocab_size * config.hidden_size
    needed = parameters * torch_dtype(dtype).itemsize / partitions
    available, owner = memory
    if needed > available:
        shape = ", ".join(f"{name}={getattr(config, name)}" for name in
                          ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
        per = f" per rank of {partitions}" if partitions > 1 else ""
        raise TrainConfigError(f"model {shape}: {parameters:,} parameters, {needed / 1e9:,.1f} GB in {dtype}{per} "
                               f"for the weights alone, more than {owner} {available / 1e9:,.1f} GB")


def check_lora_base(cfg: TrainConfig) -> None:
    """LoRA adapts pretrained weights: a preset's random ones, or trained token rows on a model whose head
    is its input embedding, are refused before anything is read or written."""
    if not cfg.lora_r:
        return
    model_dir = find_model_dir(cfg.model_name, cfg.cache_dir)
    if model_dir is None:
        raise TrainConfigError(f"lora_r={cfg.lora_r} with model_name={cfg.model_name!r}, a preset with random "
                               "weights: LoRA adapts a pretrained model, give its directory")
    if cfg.lora_train_new_tokens and GPTNeoXConfig.from_hf(model_dir).tie_word_embeddings:
        raise TrainConfigError(f"lora_train_new_tokens=true needs separate input and output embeddings, and "
                               f"{model_dir} ties them: set lora_train_new_tokens false")


def build_training_model(cfg: TrainConfig, config: GPTNeoXConfig, ds_config: dict,
                         token_ids: list[int] = ()) -> tuple[GPTNeoX, str]:
    """The model to train (of training_model_config's `config`) and a line for the log. (Chat and the
    reports load an exported directory with gptneox.chat.load_model_and_tokenizer instead.)

    Under ZeRO-3 it is built partitioned and pretrained weights stream into the partitions
    (gptneox.training.partitioned). Otherwise pretrained weights load straight in the training dtype and
    onto this rank's device, so a 7B model costs each rank one 16-bit copy rather than an fp32 one in host
    memory (DeepSpeed keeps its own fp32 master copy in the optimizer). A model from a preset is
    initialised at its full vocabulary; a pretrained one gets its new rows at the mean of the stored ones.

    With LoRA (cfg.lora) the model is frozen in the training dtype and gets adapters, and trained rows for
    `token_ids` (gptneox.lora.add_lora); DeepSpeed then holds optimizer state for those alone."""
    model_dir = find_model_dir(cfg.model_name, cfg.cache_dir)
    partitioned = zero_stage(ds_config) == 3
    if model_dir is None:
        model = build_partitioned(config, ds_config) if partitioned else GPTNeoX(config)
        origin = f"preset {cfg.model_name!r}, random init"
    elif partitioned:
        model = build_partitioned(config, ds_config)
        load_partitioned(model, model_dir, GPTNeoXConfig.from_hf(model_dir))
        origin = str(model_dir)
    else:
        device = get_accelerator().current_device_name()
        model = GPTNeoX.from_pretrained(model_dir, dtype=torch_dtype(cfg.dtype), device=device)
        model.resize_token_embeddings(config.vocab_size)
        origin = str(model_dir)
    lora = ""
    if cfg.lora:
        embeddings = [model.gpt_neox.embed_in.weight, model.embed_out.weight]
        torch.manual_seed(cfg.rng_seed)  # the same adapters however the base was built (ZeRO-3 draws an init)
        with deepspeed.zero.GatheredParameters(embeddings):  # ZeRO-3: the rows are copied from the whole weights
            add_lora(model, cfg.lora, token_ids)
        trained = sum(parameter_shape(p).numel() for p in model.parameters() if p.requires_grad)
        lora = (f", LoRA r {cfg.lora.r} on {','.join(cfg.lora.target_modules)}"
                f"{f' + {len(token_ids)} token rows' if token_ids else ''} ({trained:,} trained parameters)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        model.compile_blocks()
    model.attention_backend, kernels = choose_attention_backend(cfg, get_accelerator().device_name())
    layout = ", ZeRO-3 partitions" if partitioned else ""
    compiled = ", blocks compiled" if cfg.compile else ""
    return model, f"model from {origin}{layout}, vocab {model.config.vocab_size}, " \
                  f"attention {model.attention_backend} ({kernels}){compiled}{lora}"


def choose_attention_backend(cfg: TrainConfig, device_type: str) -> tuple[str, str]:
    """(backend, the kernels it uses), checked against the device and dtype from the config alone, so that a
    backend that cannot run here stops the run before any weight is read (gptneox.train calls this first)."""
    backend = cfg.attention_backend or ("flash" if cfg.use_flash_attention else "sdpa")
    key = (f"attention_backend={backend!r}" if cfg.attention_backend
           else f"use_flash_attention={cfg.use_flash_attention}")
    try:
        return backend, check_backend(backend, device_type, torch_dtype(cfg.dtype), training=True)
    except AttentionBackendError as err:
        without = ("; or train without it: use_flash_attention false (PyTorch SDPA) or attention_backend flex"
                   if backend == "flash" else "")
        raise TrainConfigError(f"{key} with dtype {cfg.dtype} on {device_type}: {err}{without}") from None


def check_dtype_supported(cfg: TrainConfig) -> None:
    """DeepSpeed refuses a 16-bit dtype its accelerator lacks only inside deepspeed.initialize, after the data
    and weights are read, with a traceback; here it is one line at start (gptneox.train calls this first)."""
    accelerator = get_accelerator()
    supported = {"fp16": accelerator.is_fp16_supported, "bf16": accelerator.is_bf16_supported}.get(cfg.dtype)
    if supported is not None and not supported():
        alternative = "bf16" if cfg.dtype == "fp16" and accelerator.is_bf16_supported() else "fp32"
        raise TrainConfigError(f"dtype={cfg.dtype!r}: DeepSpeed does not train in {cfg.dtype} on the "
                               f"{accelerator.device_name()} accelerator; use --dtype {alternative} here "
                               "(the defaults section's fp16 is for GPUs)")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and LayerNorm weights (all 1-D parameters) get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if len(parameter_shape(parameter)) >= 2 else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
