"""How much GPU and host memory a training run needs under ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload.

The estimate is built term by term from what the code allocates, so each term can be checked:
- model states follow DeepSpeed 0.19's buffers (runtime/zero/stage_1_and_2.py, stage3.py): 16-bit weights
  (replicated under stage 2, partitioned under 3), the fp32 master partition, Adam's two fp32 moments, the
  16-bit gradient partition, the reduce bucket, and at the optimizer step the fp32 gradient partition;
- activations are the tensors autograd keeps from forward to backward in our model (counted per token
  below, and measured on a tiny model in tests/), all of them or only each block's input under gradient
  checkpointing, which then recomputes one block at a time during backward;
- the loss buffers are those of the chunked LM-head loss (gptneox/training/loss.py).
The GPU peak is the persistent states plus the larger of the forward/backward working set and the
optimizer-step working set (activations are freed before the step).
With LoRA the base weights are frozen in the 16-bit training dtype (no fp32 master, gradient or Adam state);
those states exist only for the adapters and the trained chat-token rows, and a frozen Linear keeps no input
for a weight gradient, so the activations shrink too (LoraPlan). Allocator fragmentation and the CUDA
context are not modelled: a configuration "fits" when the estimate leaves HEADROOM of the GPU free.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.errors import UserError
from gptneox.lora import DEFAULT_TARGET_MODULES
from gptneox.training.loss import DEFAULT_CHUNK_ROWS
from gptneox.weights import DEFAULT_SHARD_SIZE, parse_size

HEADROOM = 0.10          # fraction of GPU memory left for fragmentation, the CUDA context and NCCL buffers
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32 = 4


class PlanError(UserError, ValueError):
    """A DeepSpeed config the planner cannot estimate (a ZeRO stage other than 2 or 3)."""


def linear_shapes(config: GPTNeoXConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each Linear of a block that a LoRA adapter can target."""
    h, inner = config.hidden_size, config.intermediate_size
    return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, inner),
            "dense_4h_to_h": (inner, h)}


@dataclass(frozen=True)
class LoraPlan:
    """What of a LoRA run sets its memory: rank, targets, dropout (it keeps a copy of each target's input),
    and how many token rows of embed_in and of embed_out are trained with the adapters (the chat tokens)."""
    r: int
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    dropout: float = 0.0
    trained_token_rows: int = 0

    def trainable_parameters(self, config: GPTNeoXConfig) -> dict[str, int]:
        shapes = linear_shapes(config)
        adapters = config.num_hidden_layers * sum(self.r * sum(shapes[name]) for name in self.target_modules)
        embeddings = 1 if config.tie_word_embeddings else 2
        return {"adapters": adapters, "trained token rows": embeddings * self.trained_token_rows * config.hidden_size}

    def merged_parameters(self, config: GPTNeoXConfig) -> int:
        """Elements of the base weights that the export merges adapters or trained rows into."""
        shapes = linear_shapes(config)
        targets = config.num_hidden_layers * sum(shapes[name][0] * shapes[name][1] for name in self.target_modules)
        embeddings = 1 if config.tie_word_embeddings else 2
        return targets + (embeddings * config.vocab_size * config.hidden_size if self.trained_token_rows else 0)


@dataclass(frozen=True)
class ParameterCounts:
    """Element counts from the model itself, built on the meta device (no memory, exact shapes)."""
    total: int
    largest_block: int          # the most parameters one module's forward needs at once (block or head)
    persistent: int             # parameters at or below ZeRO-3's persistence threshold (never partitioned)


def parameter_counts(config: GPTNeoXConfig, persistence_threshold: int) -> ParameterCounts:
    with torch.device("meta"):
        model = GPTNeoX(config)
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head counts once
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.gpt_neox.layers]
    matrices = [model.gpt_neox.embed_in.weight.numel(), model.embed_out.weight.numel()]
    return ParameterCounts(total=sum(p.numel() for p in unique), largest_block=max(blocks + matrices),
                           persistent=sum(p.numel() for p in unique if p.numel() <= persistence_threshold))


def saved_activation_bytes_per_token(config: GPTNeoXConfig, dtype: str, checkpointing: bool,
                                     layer_norm_stats_bytes: int = FP32, lora: LoraPlan | None = None,
                                     dropout_mask_bytes: int = 1) -> dict[str, float]:
    """Bytes per token that autograd keeps from forward to backward, by part of the model.

    Per block (SDPA/flash attention): the block input, the two LayerNorm outputs, the fused qkv output
    (rotary embeddings are applied to it in place; q, k and v are views of it), the attention output, the
    MLP's up-projection and its GELU output, all in the training dtype; mean and rstd of both LayerNorms
    (fp32 on CUDA; torch's CPU kernel keeps them in the input dtype, hence `layer_norm_stats_bytes`) and the
    attention's fp32 logsumexp per head.
    A sequential-residual block also keeps the mid-block sum. Under checkpointing a block keeps only its input.

    With LoRA (frozen base) a Linear's input is kept only where an adapter reads it: the LayerNorm outputs
    and the GELU output go unless their Linear is a target. Each target keeps its adapter's [tokens, r]
    down-projection and, with dropout, the dropped-out copy of its input and the dropout mask (a bool on
    CUDA; torch's CPU kernel keeps it in the input dtype, hence `dropout_mask_bytes`). This is exact with
    trained token rows, where the graph starts at the embedding; without them it is an upper bound (the
    first block then keeps less).
    """
    s, h, inner = BYTES[dtype], config.hidden_size, config.intermediate_size
    if checkpointing:
        block = s * h
    else:
        mid_sum = 0 if config.use_parallel_residual else h
        always = h + 3 * h + h + inner + mid_sum  # input, qkv, attention output, up-projection (GELU's input)
        # a Linear's input kept for its weight gradient beyond those (dense reads the attention output)
        inputs = {"query_key_value": h, "dense": 0, "dense_h_to_4h": h, "dense_4h_to_h": inner}
        if lora is None:
            kept, masks = always + sum(inputs.values()), 0
        else:
            dropped = [linear_shapes(config)[name][0] if lora.dropout else 0 for name in lora.target_modules]
            kept = always + sum(lora.r + (d or inputs[name]) for name, d in zip(lora.target_modules, dropped))
            masks = dropout_mask_bytes * sum(dropped)
        block = s * kept + masks + layer_norm_stats_bytes * 2 * 2 + FP32 * config.num_attention_heads
    rotary = 2 * s * (config.rotary_ndims // 2)  # cos and sin of half the rotary dims, shared by all blocks
    # the embedding's backward keeps the token ids (int64); with LoRA's trained rows, each token's row in
    # the trained rows (int64) and whether it is one of them (bool)
    ids = 8 if lora is None else 8 + 1
    return {"blocks": config.num_hidden_layers * block,
            "embedding and final LayerNorm": ids + rotary + s * h + layer_norm_stats_bytes * 2}


def block_recompute_bytes_per_token(config: GPTNeoXConfig, dtype: str, lora: LoraPlan | None = None) -> float:
    """Under checkpointing, backward recomputes one block: its full saved set is alive for that block, plus
    the gradients flowing through it (taken as two [tokens, intermediate] tensors)."""
    one_block = dataclasses.replace(config, num_hidden_layers=1)
    full = saved_activation_bytes_per_token(one_block, dtype, checkpointing=False, lora=lora)["blocks"]
    return full + 2 * BYTES[dtype] * config.intermediate_size


def loss_buffer_bytes(config: GPTNeoXConfig, dtype: str, trained_tokens: int,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS, lora: LoraPlan | None = None) -> dict[str, float]:
    """What ChunkedLinearCrossEntropy holds at the loss's backward (the start of backward).

    fp32/bf16: the hidden-state gradient of the trained rows and the fp32 head-weight gradient, both made in
    forward, and the cast of the latter to the weight dtype. fp16 recomputes in backward: it keeps the trained
    rows' hidden states (a gathered copy) and then builds the same gradients. Plus one chunk of fp32 logits
    and its gradient in the training dtype.
    With LoRA the head weight is frozen: no weight gradient. Its trained token rows (if any) are copied into
    a copy of the weight that the loss projects onto, and only those rows get a gradient.
    """
    s, h, v = BYTES[dtype], config.hidden_size, config.vocab_size
    rows = min(chunk_rows, trained_tokens)
    with_cast = FP32 + (s if s != FP32 else 0)
    if lora is None:
        head = {"head weight gradient (fp32 + cast)": v * h * with_cast}
    elif lora.trained_token_rows:
        head = {"head weight with the trained rows in place": v * h * s,
                "trained head rows' gradient (fp32 + cast)": lora.trained_token_rows * h * with_cast}
    else:
        head = {}
    return {"trained hidden rows and their gradient": (2 if dtype == "fp16" else 1) * trained_tokens * h * s,
            **head, "one chunk of logits": rows * v * with_cast}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpus_per_node: int
    gpu_memory_gb: float
    host_memory_gb: float | None = None


@dataclass(frozen=True)
class Batch:
    micro_batch: int
    max_length: int
    dtype: str = "fp16"

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.max_length


@dataclass
class Plan:
    """One configuration's estimate; every term is in bytes, per GPU or per node."""
    name: str
    gpu_states: dict[str, float] = field(default_factory=dict)          # for the whole run
    gpu_step: dict[str, float] = field(default_factory=dict)            # only during optimizer.step
    host_per_node: dict[str, float] = field(default_factory=dict)
    disk: dict[str, float] = field(default_factory=dict)

    def gpu_peak(self, activation_peak: float) -> float:
        return sum(self.gpu_states.values()) + max(activation_peak, sum(self.gpu_step.values()))


def zero_plans(config: GPTNeoXConfig, hardware: Hardware, batch: Batch, zero_sections: dict[str, dict],
               lora: LoraPlan | None = None) -> list[Plan]:
    """One Plan per named `zero_optimization` section (resolved: no "auto" left). With `lora` the optimizer
    (fp32 master, Adam moments, gradients) holds only the adapters and trained token rows; the base weights
    stay frozen in the training dtype, and checkpoints hold only what is trained."""
    s = BYTES[batch.dtype]
    n, per_node = hardware.gpus, hardware.gpus_per_node
    plans = []
    for name, zero in zero_sections.items():
        stage = zero.get("stage", 0)
        offload_params = zero.get("offload_param", {}).get("device", "none") != "none"
        offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") != "none"
        counts = parameter_counts(config, int(zero.get("stage3_param_persistence_threshold", 0)) if stage == 3 else 0)
        psi = counts.total
        trained = psi if lora is None else sum(lora.trainable_parameters(config).values())
        weights = psi if lora is None else psi + trained  # the module: base (+ adapters and token rows)
        plan = Plan(name)
        bucket = float(zero.get("reduce_bucket_size", 5e8)) * s  # allocated whole, whatever is trained
        rank_states = {"master weights (fp32)": FP32 * trained / n, "optimizer (Adam m, v)": 2 * FP32 * trained / n,
                       "gradients (partition)": s * trained / n}
        if stage == 2:
            if lora is None:
                plan.gpu_states["weights (16-bit, replicated)"] = s * psi
            else:
                plan.gpu_states["frozen base weights (16-bit, replicated)"] = s * psi
                plan.gpu_states["adapters + trained token rows (16-bit)"] = s * trained
            plan.gpu_states.update(rank_states)
            plan.gpu_states["reduce bucket"] = bucket
            plan.gpu_step["fp32 gradient partition"] = FP32 * trained / n
        elif stage == 3:
            live = min(float(zero.get("stage3_max_live_parameters", 1e9)),
                       counts.largest_block + float(zero.get("stage3_prefetch_bucket_size", 5e7)))
            plan.gpu_states["weights partition (16-bit)"] = (0.0 if offload_params else
                                                             s * (weights - counts.persistent) / n)
            plan.gpu_states["persistent small parameters"] = s * counts.persistent
            plan.gpu_states["gathered weights (block + prefetch)"] = s * live
            if not offload_optimizer:
                plan.gpu_states.update(rank_states)
                sub_group = float(zero.get("sub_group_size", 1e9))
                plan.gpu_step["fp32 gradient partition"] = FP32 * min(sub_group, trained / n)
            plan.gpu_states["reduce bucket"] = bucket
        else:
            raise PlanError(f"{name}: zero_optimization.stage={stage}; the planner covers stages 2 and 3")
        host_rank = {}
        if offload_params:
            host_rank["weights partition (16-bit, pinned)"] = s * weights / n
        if offload_optimizer:
            host_rank.update(rank_states)
            host_rank["fp32 gradient partition"] = FP32 * trained / n
        plan.host_per_node = {key: value * per_node for key, value in host_rank.items()}
        # the export on rank 0 (zero_to_fp32, optimizer files memory-mapped and their moments dropped): under
        # stage 2 the consolidated fp32 weights and their cast to the training dtype; under stage 3 one shard
        # of the export at a time (each weight is gathered when its shard is written)
        if lora is None:
            exported = psi * s if stage == 2 else parse_size(DEFAULT_SHARD_SIZE)  # bytes made at once, cast
            plan.host_per_node["final export on rank 0 (fp32 + cast; ZeRO-3: one shard)"] = exported / s * FP32 + exported
        else:  # the base read in the training dtype, the weights with adapters merged in fp32, one shard cast
            merged = lora.merged_parameters(config)
            plan.host_per_node["final export on rank 0 (base 16-bit, merged weights fp32, one shard)"] = (
                s * (psi - merged) + FP32 * merged + parse_size(DEFAULT_SHARD_SIZE))
        plan.disk["checkpoint: optimizer partitions (fp32 master, m, v)"] = 3 * FP32 * trained
        if stage == 2:
            plan.disk["checkpoint: 16-bit module" + ("" if lora is None else " (trained parameters)")] = s * trained
        plan.disk["final Hugging Face export"] = s * psi
        if lora is not None:
            plan.disk["final export: PEFT adapter"] = s * trained
        plans.append(plan)
    return plans


def activation_terms(config: GPTNeoXConfig, batch: Batch, checkpointing: bool,
                     lora: LoraPlan | None = None) -> dict[str, float]:
    """Per-GPU activation memory of one micro-batch (every token taken as trained: the worst case)."""
    saved = saved_activation_bytes_per_token(config, batch.dtype, checkpointing, lora=lora)
    terms = {f"activations: {part}": per_token * batch.tokens for part, per_token in saved.items()}
    loss = loss_buffer_bytes(config, batch.dtype, batch.tokens, lora=lora)
    recompute = (block_recompute_bytes_per_token(config, batch.dtype, lora) * batch.tokens if checkpointing
                 else 0.0)
    # the loss buffers are gone before the first block's backward (and its recomputation) starts
    terms["backward working set (max of loss buffers, block recompute)"] = max(sum(loss.values()), recompute)
    return terms
