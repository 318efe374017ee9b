"""The GPT-NeoX decoder, written out by hand with Hugging Face parameter names and layouts.

    x = embed_in(input_ids)
    for each block:
        parallel residual:    x = x + attn(ln1(x)) + mlp(ln2(x))
        sequential residual:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
    logits = embed_out(final_layer_norm(x))

Attention uses a fused per-head QKV projection (the output features are [head][q|k|v][head_dim]) and
GPT-NeoX "rotate-half" rotary embeddings on the first `rotary_ndims` dims of each head.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import BACKENDS, AttentionMask, KVCache, attend, flash_kernels
from .config import GELU_APPROXIMATION, GPTNeoXConfig
from .sizes import round_up
from .weights import check_config_fits_weights, load_weights, save_pretrained

# torch's layer_norm kernels (CPU and CUDA) accumulate mean and variance in fp32 for fp16/bf16 inputs,
# so nn.LayerNorm already keeps its statistics in fp32; tests/test_attention.py checks this.
LayerNorm = nn.LayerNorm


def rotary_cos_sin(position_ids: torch.Tensor, config: GPTNeoXConfig, dtype: torch.dtype):
    """cos, sin [B, T, 1, 1, rotary_ndims / 2] for each token's position (the two halves of the rotated
    dims share their angles, so only one half is kept).

    Angles are computed in fp32 (fp16 cannot even represent positions above 2048 exactly) and only the
    final cos/sin are cast to the activation dtype, as transformers does.
    """
    r = config.rotary_ndims
    inv_freq = 1.0 / (config.rotary_emb_base ** (
        torch.arange(0, r, 2, dtype=torch.float32, device=position_ids.device) / r))
    angles = (position_ids.float()[..., None] * inv_freq)[:, :, None, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class _RotateQK(torch.autograd.Function):
    """GPT-NeoX "rotate-half" rotary embedding of q and k, applied in place to the fused QKV output.

    qkv [B * T, H * 3 * D] ([head][q|k|v][head_dim], the Hugging Face layout); only the first
    2 * cos.shape[-1] dims of each q and k head change. Written out (rather than rotating a copy and
    `cat`-ing it back onto the pass-through dims) so that no activation is copied: q, k and v stay views of
    the projection output and the backward writes the projection's gradient once (unbind's stack) and
    un-rotates it in place.
    The projection's backward needs only its input and weight, so overwriting its output is safe.
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads):
        ctx.mark_dirty(qkv)
        ctx.save_for_backward(cos, sin)
        ctx.num_heads = num_heads
        _rotate(qkv, cos, sin, num_heads)
        return qkv

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        # The rotation is orthogonal: its gradient is the rotation by the opposite angle. `grad` is the
        # fresh tensor that unbind's backward stacked for this op alone, so it may be overwritten.
        _rotate(grad, cos, -sin, ctx.num_heads)
        return grad, None, None, None


def _rotate(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the rotary dims of q and k, in place.
    qkv [B * T, H * 3 * D]; cos, sin [B, T, 1, 1, rotary_ndims / 2]."""
    B, T, half = cos.shape[0], cos.shape[1], cos.shape[-1]
    qkv = qkv.view(B, T, num_heads, 3, -1)
    x1, x2 = qkv[..., :2, :half], qkv[..., :2, half:2 * half]
    x1_sin, x2_sin = x1 * sin, x2 * sin
    x1.mul_(cos).sub_(x2_sin)
    x2.mul_(cos).add_(x1_sin)


@torch.no_grad()
def copy_rows(target: torch.Tensor, source: torch.Tensor) -> None:
    """`target`'s first rows from `source`; rows beyond `source`'s at the mean of its rows (a neutral embedding,
    logits near the average): how a vocabulary grows, here and when ZeRO-3 streams weights into partitions."""
    kept = min(target.shape[0], source.shape[0])
    target[:kept] = source[:kept]
    if target.shape[0] > kept:
        target[kept:] = source.float().mean(dim=0).to(target.dtype)


def state_dict_shapes(config: GPTNeoXConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of a GPTNeoX of `config`, from a meta-device model (no memory, no
    random init): what a checkpoint for that config must hold."""
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in GPTNeoX(config).state_dict().items()}


class Attention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x, rope, mask: AttentionMask, backend: str, kv_cache: KVCache | None):
        B, T, C = x.shape
        # 2-D in, so the projection output is addmm's own tensor, not a view: rotating it in place then
        # needs no CopySlices (which would clone the whole gradient)
        qkv = self.query_key_value(x.reshape(B * T, C))
        y = self.attend_heads(qkv, rope, mask, backend, kv_cache)
        return self.dense(y.reshape(B, T, C))

    @torch.compiler.disable
    def attend_heads(self, qkv, rope, mask: AttentionMask, backend: str, kv_cache: KVCache | None):
        """Rotary and the attention kernels: the projection output [B * T, H * 3 * D] -> [B, T, H, D].

        Never compiled (GPTNeoX.compile_blocks compiles the rest of each block): the kernels are fused
        already, packed rows' per-segment calls would recompile for every new set of segment lengths, and
        tracing the in-place rotation with dynamic shapes takes minutes.
        """
        B, T = mask.batch_size, mask.query_length
        if rope is not None:
            qkv = _RotateQK.apply(qkv, *rope, self.num_heads)
        q, k, v = qkv.view(B, T, self.num_heads, 3, self.head_dim).unbind(dim=3)  # views [B, T, H, D]
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)
        return attend(q, k, v, mask, backend)


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = GELU_APPROXIMATION[config.hidden_act]

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_index: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_index)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, backend, kv_cache=None):
        a = self.attention(self.input_layernorm(x), rope, mask, backend, kv_cache)
        if self.use_parallel_residual:  # both LayerNorms read the same input
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `gpt_neox.` part of the Hugging Face names: embeddings, blocks, final LayerNorm."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class LMHead(nn.Linear):
    """`embed_out`: the projection onto the vocabulary, or a function of the hidden states and this weight
    (the chunked training loss, which reads the weight itself). Such a function runs inside this module's
    forward so that ZeRO-3, which gathers a module's partitioned weights only around its forward (and
    backward), hands it the whole weight, and reduces its gradient like any other module's. Under LoRA
    (gptneox.lora.LMHeadWithTokens) it is also given `trained_rows`, the trained rows of the frozen weight."""

    def forward(self, x: torch.Tensor, head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None):
        return super().forward(x) if head is None else head(x, self.weight)


class GPTNeoX(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = Backbone(config)
        self.embed_out = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.attention_backend = "sdpa"
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Same scheme as transformers: N(0, initializer_range) weights, zero biases, unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """With tie_word_embeddings, make the LM head the very Parameter of embed_in (called again by
        whatever replaces either one: loading, resizing, export)."""
        if self.config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def compile_blocks(self) -> None:
        """torch.compile each block in place (nn.Module.compile: parameter names, state dicts and checkpoints
        are unchanged). One block's graph is compiled once and reused by all of them, so compile time does
        not grow with depth; the attention kernels run uncompiled (Attention.attend_heads)."""
        for block in self.gpt_neox.layers:
            block.compile()

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"attention_backend={name!r}; expected one of {BACKENDS}")
        if name == "flash":
            flash_kernels()  # a missing or broken flash-attn fails here, not at the first forward
        self._attention_backend = name

    @property
    def output_embedding(self) -> nn.Parameter:
        """The LM head weight [vocab, hidden]; the same Parameter as embed_in's when tied."""
        return self.embed_out.weight

    def forward(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None,
                kv_cache: KVCache | None = None, return_hidden: bool = False,
                head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None):
        """Logits [B, T, vocab] (or final hidden states [B, T, hidden] with return_hidden, or
        head(final hidden states, LM head weight) with head: see LMHead).

        position_ids [B, T]: default arange continuing after the cache; packed rows restart at 0 per segment.
        attention_mask [B, cache + T]: 1 = real token, 0 = padding (left or right).
        segment_ids [B, T]: packed rows; a token attends only to earlier tokens of its own segment.
        kv_cache: from new_kv_cache(); the new tokens' keys and values are appended and its length advances.
        """
        mask = self._attention_mask(input_ids, attention_mask, segment_ids, kv_cache)
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(mask.offset, mask.key_length, device=input_ids.device).expand(B, T)
        elif position_ids.shape != (B, T):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {(B, T)}")

        x = self.gpt_neox.embed_in(input_ids)
        rope = rotary_cos_sin(position_ids, self.config, x.dtype) if self.config.rotary_ndims else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.gpt_neox.layers:
            if checkpointing and kv_cache is None:
                x = checkpoint(block, x, rope, mask, self.attention_backend, use_reentrant=False)
            else:
                x = block(x, rope, mask, self.attention_backend, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.gpt_neox.final_layer_norm(x)
        return x if return_hidden else self.embed_out(x, head)

    def _attention_mask(self, input_ids, attention_mask, segment_ids, kv_cache) -> AttentionMask:
        """Validate the optional inputs and reduce them to the least the kernels need.

        Padding that only trails each row cannot reach a real token through a causal mask, so it is
        dropped and the fast plain-causal path stays in use for right-padded training batches.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache holds batch {kv_cache.batch_size}, input_ids has batch {B}")
            if past + T > kv_cache.max_length:
                raise ValueError(f"kv_cache is full: {past} cached + {T} new tokens > max_length "
                                 f"{kv_cache.max_length}")
        padding, left_padded = None, False
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(B, past + T)} (cached + new tokens)")
            padding = attention_mask.bool()
            # one host sync per forward for all three facts (decoding pays it once per token)
            all_real, only_trailing, left_padded = torch.stack([
                padding.all(), (padding[:, 1:] <= padding[:, :-1]).all(),
                (padding[:, 1:] >= padding[:, :-1]).all()]).tolist()
            if (only_trailing and kv_cache is None) or all_real:
                padding = None
        segments = None
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be combined with a kv_cache")
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected {(B, T)}")
            # number the contiguous runs so that a reused id in a later run is still a new segment
            segments = F.pad((segment_ids[:, 1:] != segment_ids[:, :-1]).cumsum(1), (1, 0))
        return AttentionMask(B, T, past + T, padding, segments, cached=kv_cache is not None, left_padded=left_padded)

    def new_kv_cache(self, batch_size: int, max_length: int, dtype=None, device=None) -> KVCache:
        weight = self.embed_out.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, max_length, c.num_attention_heads, c.head_dim,
                       dtype=dtype or weight.dtype, device=device or weight.device)

    def generate(self, input_ids, **kwargs):
        """See gptneox.generate.generate."""
        from .generate import generate
        return generate(self, input_ids, **kwargs)

    @torch.no_grad()
    def resize_token_embeddings(self, num_tokens: int, pad_to_multiple_of: int = 1) -> int:
        """Make the vocabulary exactly ceil(num_tokens / pad_to_multiple_of) * pad_to_multiple_of rows.

        New rows start at the mean of the old rows (a neutral embedding, logits near the average). A smaller
        size shrinks the vocabulary, keeping the first rows; whether that is wanted is the caller's choice
        (the trainer only ever grows, to the tokenizer length rounded up). Returns the new row count.
        """
        if num_tokens <= 0 or pad_to_multiple_of <= 0:
            raise ValueError(f"resize_token_embeddings({num_tokens}, pad_to_multiple_of={pad_to_multiple_of}): "
                             "both must be positive")
        rows = round_up(num_tokens, pad_to_multiple_of)
        if rows == self.config.vocab_size:
            return rows

        def resized(weight: torch.Tensor) -> nn.Parameter:
            new = weight.new_empty(rows, weight.shape[1])
            copy_rows(new, weight)
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.gpt_neox.embed_in.weight = resized(self.gpt_neox.embed_in.weight)
        self.gpt_neox.embed_in.num_embeddings = rows
        if not self.config.tie_word_embeddings:
            self.embed_out.weight = resized(self.embed_out.weight)
        self.tie_weights()
        self.embed_out.out_features = rows
        self.config = dataclasses.replace(self.config, vocab_size=rows)
        return rows

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None, device=None) -> "GPTNeoX":
        """Load a Hugging Face GPT-NeoX directory; dtype None = float32, "auto" = as stored.

        The model is built on the meta device (no random initialisation) and gptneox.weights fills it."""
        config = GPTNeoXConfig.from_hf(path)
        check_config_fits_weights(config, path)  # before a layer is built
        with torch.device("meta"):
            model = cls(config)
        load_weights(model, path, dtype=dtype, device=device)
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "2GB") -> None:
        """Write config.json and safetensors shards that transformers loads with no renaming."""
        save_pretrained(self, path, max_shard_size=max_shard_size)
