"""Causal self-attention kernels behind one switch, plus the KV cache they read from.

Every backend takes q [B, T, H, D] and k, v [B, S, H, D] (S = cached + new tokens, the new queries are the
last T keys) and returns [B, T, H, D]. Who may attend to whom is described once per forward by an
`AttentionMask`, so a dense mask or varlen index is built at most once and shared by all layers.

- "sdpa":  torch scaled_dot_product_attention; plain causal uses is_causal (no mask is materialised).
- "eager": explicit fp32 scores and softmax; the slow, obviously-correct reference.
- "flash": flash-attn 2 (CUDA, fp16/bf16); padding and packed segments go through the varlen kernel.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "eager", "flash")


@dataclass
class AttentionMask:
    """Which keys each query may see: causal, and optionally only real keys and keys of the same segment.

    Positions of padding queries produce finite values that no real token depends on; every query may at
    least see itself so that no softmax row is empty.
    """

    batch_size: int
    query_length: int
    key_length: int
    padding: torch.Tensor | None = None   # [B, S] bool, True = real token
    segments: torch.Tensor | None = None  # [B, S] long run ids, only without a cache (S == T)
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _varlen: tuple | None = field(default=None, repr=False)
    _spans: list | None = field(default=None, repr=False)

    @property
    def offset(self) -> int:
        """Index of the first query among the keys (the cache length)."""
        return self.key_length - self.query_length

    @property
    def is_causal_only(self) -> bool:
        return self.padding is None and self.segments is None

    def dense(self, device: torch.device) -> torch.Tensor:
        """[B or 1, 1, T, S] bool, True = may attend."""
        if self._dense is None:
            queries = torch.arange(self.offset, self.key_length, device=device)[:, None]
            keys = torch.arange(self.key_length, device=device)[None, :]
            allowed = (keys <= queries)[None, None]
            if self.padding is not None:
                allowed = allowed & self.padding[:, None, None, :]
            if self.segments is not None:
                allowed = allowed & (self.segments[:, None, :, None] == self.segments[:, None, None, :])
            self._dense = allowed | (keys == queries)
        return self._dense

    @property
    def is_segments_only(self) -> bool:
        """Packed rows with no padding mask: attention splits into independent causal runs.
        (No cache check: GPTNeoX rejects segment_ids with a kv_cache.)"""
        return self.segments is not None and self.padding is None

    def segment_spans(self) -> list[list[tuple[int, int]]]:
        """For each row, the [start, end) of each segment run (read once per forward, shared by the layers)."""
        if self._spans is None:
            self._spans = []
            for row in self.segments.tolist():
                starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
                self._spans.append(list(zip(starts, starts[1:] + [len(row)])))
        return self._spans

    def varlen(self, device: torch.device) -> tuple:
        """Index bookkeeping for flash_attn_varlen_func: each (row, segment) of real tokens is one sequence.

        Removing padding keeps the order of real tokens, so causality within a sequence is unchanged and the
        queries stay the tail of their sequence (the kernel's bottom-right causal alignment).
        Returns (query_rows, query_cols, key_rows, key_cols, cu_seqlens_q, cu_seqlens_k, max_q, max_k).
        """
        if self._varlen is None:
            B, S = self.batch_size, self.key_length
            valid = self.padding if self.padding is not None else torch.ones(B, S, dtype=torch.bool, device=device)
            rows, cols = valid.nonzero(as_tuple=True)
            starts = torch.ones_like(rows, dtype=torch.bool)
            starts[1:] = rows[1:] != rows[:-1]
            if self.segments is not None:
                seg = self.segments[rows, cols]
                starts[1:] |= seg[1:] != seg[:-1]
            sequence = starts.cumsum(0) - 1
            count = int(sequence[-1]) + 1
            is_query = cols >= self.offset
            k_lens = torch.bincount(sequence, minlength=count)
            q_lens = torch.bincount(sequence[is_query], minlength=count)
            cu_k = F.pad(k_lens.cumsum(0), (1, 0)).to(torch.int32)
            cu_q = F.pad(q_lens.cumsum(0), (1, 0)).to(torch.int32)
            self._varlen = (rows[is_query], cols[is_query] - self.offset, rows, cols, cu_q, cu_k,
                            int(q_lens.max()), int(k_lens.max()))
        return self._varlen


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str) -> torch.Tensor:
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    if backend == "eager":
        return _eager(q, k, v, mask)
    if backend == "flash":
        return _flash(q, k, v, mask)
    raise ValueError(f"attention_backend={backend!r}; expected one of {BACKENDS}")


def _sdpa(q, k, v, mask: AttentionMask) -> torch.Tensor:
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T, S = mask.query_length, mask.key_length
    if mask.is_causal_only and T == S:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif mask.is_causal_only and T == 1:  # one new token sees the whole cache
        out = F.scaled_dot_product_attention(q, k, v)
    elif mask.is_segments_only:  # packed rows: causal attention per segment costs sum(n^2), not T^2
        out = torch.cat([
            torch.cat([F.scaled_dot_product_attention(q[r:r + 1, :, a:b], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b],
                                                      is_causal=True) for a, b in spans], dim=2)
            for r, spans in enumerate(mask.segment_spans())])
    else:  # is_causal would align top-left with a cache, so use an explicit mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device))
    return out.transpose(1, 2)


def _eager(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """Scores and softmax in fp32 (fp16 q.k can overflow to inf), so this stays the reference."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _flash(q, k, v, mask: AttentionMask) -> torch.Tensor:
    flash_attn = import_flash_attn()
    check_flash_inputs(q)
    if mask.is_causal_only:  # flash-attn's causal mask is bottom-right aligned, so this covers a cache too
        return flash_attn.flash_attn_func(q, k, v, causal=True)
    q_rows, q_cols, k_rows, k_cols, cu_q, cu_k, max_q, max_k = mask.varlen(q.device)
    out = flash_attn.flash_attn_varlen_func(q[q_rows, q_cols], k[k_rows, k_cols], v[k_rows, k_cols],
                                            cu_q, cu_k, max_q, max_k, causal=True)
    full = q.new_zeros(q.shape)
    full[q_rows, q_cols] = out
    return full


def import_flash_attn():
    """The flash_attn module, or an error saying how to get it (checked when the backend is chosen)."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError as err:
        raise RuntimeError("attention_backend='flash' needs the flash-attn package "
                           "(pip install 'gptneox[flash]'); use 'sdpa' otherwise") from err


def check_flash_inputs(q: torch.Tensor) -> None:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attention_backend='flash' runs only on CUDA in float16/bfloat16, got "
                           f"{q.device.type} {q.dtype}; use 'sdpa' here")


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding.

    Layout [layer, batch, position, head, head_dim] so that a slice is already what flash-attn reads.
    The model's forward writes the new tokens of each layer, then advances `length` once.
    """

    def __init__(self, num_layers: int, batch_size: int, max_length: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        shape = (num_layers, batch_size, max_length, num_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v [B, T, H, D] and return all keys and values so far."""
        end = self.length + k.shape[1]
        self.keys[layer, :, self.length:end] = k
        self.values[layer, :, self.length:end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reset(self) -> None:
        self.length = 0
