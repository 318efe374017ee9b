"""Causal self-attention kernels behind one switch, plus the KV cache they read from.

Every backend takes q [B, T, H, D] and k, v [B, S, H, D] (S = cached + new tokens, the new queries are the
last T keys) and returns [B, T, H, D]. Who may attend to whom is described once per forward by an
`AttentionMask`, so a dense mask or varlen index is built at most once and shared by all layers.

- "sdpa":  torch scaled_dot_product_attention; plain causal uses is_causal (no mask is materialised). Packed
           rows use torch's varlen flash kernel on CUDA in fp16/bf16, else one SDPA call per segment.
- "eager": explicit fp32 scores and softmax; the slow, obviously-correct reference.
- "flash": flash-attn (CUDA, fp16/bf16): flash-attn 2 (`flash_attn`), or flash-attn-4 (`flash_attn.cute`, the
           Hopper/Blackwell build) where flash-attn 2 is absent. Padding and packed segments go through the
           varlen kernel; decoding from a KV cache through flash_attn_with_kvcache (left padding included), or
           SDPA where the installed build has no cache kernel (flash-attn-4).
- "flex":  PyTorch FlexAttention for padding and packed rows (a document-causal block mask, compiled on CUDA),
           SDPA for everything else. No flash-attn needed; on CPU it runs forward only (torch has no CPU backward).

Under torch.use_deterministic_algorithms(True) the flash kernels are asked for their deterministic backward.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from gptneox.errors import UserError

BACKENDS = ("sdpa", "eager", "flash", "flex")
HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(UserError, ValueError):
    """An attention backend that cannot run here (package, device or dtype); raised when it is chosen."""


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
    cached: bool = False                  # the keys come from a KVCache (prefill or decoding step)
    left_padded: bool = False             # padding, if any, only precedes each row's real tokens
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _varlen: tuple | None = field(default=None, repr=False)
    _spans: list | None = field(default=None, repr=False)
    _cache_lengths: tuple | None = field(default=None, repr=False)
    _block_mask: object | None = field(default=None, repr=False)

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

    def segment_lengths(self) -> list[int]:
        """The length of every segment run, row after row: split sizes of the [B * T] flattened rows."""
        return [end - start for spans in self.segment_spans() for start, end in spans]

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

    def cache_lengths(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cache_seqlens, cache_leftpad) [B] int32 for flash_attn_with_kvcache: every row's keys end at
        key_length, and a left-padded row's real keys start after its padding. Built on the device, no sync."""
        if self._cache_lengths is None:
            ends = torch.full((self.batch_size,), self.key_length, dtype=torch.int32, device=device)
            starts = None if self.padding is None else (~self.padding).sum(1, dtype=torch.int32)
            self._cache_lengths = (ends, starts)
        return self._cache_lengths

    def block_mask(self, device: torch.device, width: int | None = None):
        """FlexAttention BlockMask of the same rule as dense(): causal, real keys, same segment, or itself;
        for rows padded to `width` tokens (the extra keys are padding). Built once per mask and width."""
        width = width or self.key_length
        if self._block_mask is None or self._block_mask[0] != width:
            from torch.nn.attention.flex_attention import create_block_mask
            B, S, offset = self.batch_size, self.key_length, self.offset
            # both tensors always, so padded and packed batches share one compiled kernel
            padding = self.padding if self.padding is not None else torch.ones(B, S, dtype=torch.bool, device=device)
            segments = self.segments if self.segments is not None else torch.zeros(B, S, dtype=torch.long,
                                                                                   device=device)
            padding, segments = F.pad(padding, (0, width - S), value=False), F.pad(segments, (0, width - S))

            def allowed(b, h, q_index, k_index):
                query = q_index + offset
                keep = (k_index <= query) & padding[b, k_index] & (segments[b, query] == segments[b, k_index])
                return keep | (k_index == query)

            self._block_mask = (width, create_block_mask(allowed, self.batch_size, None, width - offset, width,
                                                         device=device))
        return self._block_mask[1]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str) -> torch.Tensor:
    if backend == "sdpa":
        return _sdpa(q, k, v, mask)
    if backend == "eager":
        return _eager(q, k, v, mask)
    if backend == "flash":
        return _flash(q, k, v, mask)
    if backend == "flex":
        return _flex(q, k, v, mask)
    raise ValueError(f"attention_backend={backend!r}; expected one of {BACKENDS}")


def _sdpa(q, k, v, mask: AttentionMask) -> torch.Tensor:
    if mask.is_segments_only:
        if torch_varlen_usable(q):
            return _varlen(q, k, v, mask, torch_varlen_attention)
        return _sdpa_per_segment(q, k, v, mask)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T, S = mask.query_length, mask.key_length
    if mask.is_causal_only and T == S:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif mask.is_causal_only and T == 1:  # one new token sees the whole cache
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # is_causal would align top-left with a cache, so use an explicit mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device))
    return out.transpose(1, 2)


def _sdpa_per_segment(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """Packed rows: one causal SDPA call per segment, so attention costs sum(n^2), not T^2 per row.

    The segments are `split` views of the flattened rows and their outputs are joined by one `cat`, so the
    backward is one `cat` per q, k, v; slicing instead would zero-fill a full-size gradient per segment.
    bench/packed_attention.py measures this against slicing and against one masked call over whole rows.
    """
    B, T, H, D = q.shape
    lengths = mask.segment_lengths()
    pieces = zip(q.flatten(0, 1).split(lengths), k.flatten(0, 1).split(lengths), v.flatten(0, 1).split(lengths))
    # [1, H, n, D]: torch's fused CPU kernel takes only 4-D inputs (3-D ones fall back to the math path)
    out = [F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                                          is_causal=True)[0].transpose(0, 1) for qs, ks, vs in pieces]
    return torch.cat(out).view(B, T, H, D)


def torch_varlen_usable(q: torch.Tensor) -> bool:
    """torch's own varlen flash kernel (torch.nn.attention.varlen, torch >= 2.10) runs on CUDA in fp16/bf16."""
    return q.is_cuda and q.dtype in HALF_DTYPES and _torch_varlen() is not None


def torch_varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k) -> torch.Tensor:
    varlen_attn, causal = _torch_varlen()
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **causal)


@functools.cache
def _torch_varlen() -> tuple[Callable, dict] | None:
    """(varlen_attn, its causal keyword), looked up once: every layer of every packed forward calls it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    # torch 2.13 spells causal window_size=(-1, 0); the first versions (2.9-2.11) had is_causal
    causal = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters
              else {"is_causal": True})
    return varlen_attn, causal


def _eager(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """Scores and softmax in fp32 (fp16 q.k can overflow to inf), so this stays the reference."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.masked_fill(~mask.dense(q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _flash(q, k, v, mask: AttentionMask) -> torch.Tensor:
    kernels = flash_kernels()
    check_flash_inputs(q)
    if mask.cached and (mask.padding is None or mask.left_padded):
        if kernels.with_kvcache is None:  # flash-attn-4 has no cache kernel: decoding is SDPA's job
            return _sdpa(q, k, v, mask)
        ends, starts = mask.cache_lengths(q.device)
        return kernels.with_kvcache(q, k, v, ends, starts)
    if mask.is_causal_only:  # flash-attn's causal mask is bottom-right aligned, so this covers a cache too
        return kernels.dense(q, k, v)
    return _varlen(q, k, v, mask, kernels.varlen)


def _varlen(q, k, v, mask: AttentionMask, kernel: Callable) -> torch.Tensor:
    """Each (row, segment) of real tokens becomes one sequence of a varlen kernel call."""
    q_rows, q_cols, k_rows, k_cols, cu_q, cu_k, max_q, max_k = mask.varlen(q.device)
    out = kernel(q[q_rows, q_cols], k[k_rows, k_cols], v[k_rows, k_cols], cu_q, cu_k, max_q, max_k)
    full = q.new_zeros(q.shape)
    full[q_rows, q_cols] = out
    return full


def _flex(q, k, v, mask: AttentionMask) -> torch.Tensor:
    """FlexAttention where a mask is needed without a cache (padding, packed rows); SDPA's fused kernels
    already cover plain causal attention and decoding.

    The row is padded to its `flex_width` bucket (the extra keys are masked, the extra queries see only
    themselves and are cut off again), so a run compiles the kernel once per bucket, not once per width."""
    if mask.cached or mask.is_causal_only:
        return _sdpa(q, k, v, mask)
    T = q.shape[1]
    width = flex_width(T)
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, width - T)).transpose(1, 2) for t in (q, k, v))
    kernel = flex_attention_function(q.device.type)
    if q.is_cuda:
        _FLEX_SIGNATURES.add((tuple(q.shape), q.dtype))
        out = kernel(q, k, v, block_mask=mask.block_mask(q.device, width))
    else:
        with warnings.catch_warnings():  # off CUDA the unfused path is the only one; its warning says to compile
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = kernel(q, k, v, block_mask=mask.block_mask(q.device, width))
    return out.transpose(1, 2)[:, :T]


FLEX_MIN_WIDTH = 128
# Compiled with static shapes, each bucket is one compilation: 2 buckets per doubling from 128 to 32k tokens
# (17 buckets), times a few batch sizes. torch's default limit (8) would send the rest to the unfused kernel,
# whose memory grows with the square of the width, so the limit is raised to this when flex is compiled.
FLEX_RECOMPILE_LIMIT = 64
_FLEX_SIGNATURES: set = set()


def flex_width(length: int) -> int:
    """The bucket a FlexAttention row of `length` tokens is padded to: the smallest 2^k or 1.5 * 2^k (at least
    128) that holds it, so padding adds at most a third and a run sees a handful of widths."""
    width = FLEX_MIN_WIDTH
    while width < length:
        width = width * 3 // 2 if width & (width - 1) == 0 else width * 4 // 3
    return width


def flex_compilations() -> int:
    """How many shapes the compiled CUDA FlexAttention kernel has been called with in this process: each one
    was a compilation (static shapes). Logged with every training step, so a run that recompiles per batch,
    or past FLEX_RECOMPILE_LIMIT (where torch falls back to the unfused kernel), shows it."""
    return len(_FLEX_SIGNATURES)


@functools.cache
def flex_attention_function(device_type: str) -> Callable:
    """flex_attention compiled once on CUDA (uncompiled it materialises every score); on CPU torch only has the
    uncompiled forward, which is what the CPU tests check against eager."""
    from torch.nn.attention.flex_attention import flex_attention
    if device_type != "cuda":
        return flex_attention
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(dynamo, name, max(getattr(dynamo, name), FLEX_RECOMPILE_LIMIT))
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class FlashKernels:
    """The three calls _flash needs, whichever flash-attn build provides them (all causal, [.., H, D])."""

    name: str
    dense: Callable          # (q, k, v) [B, T|S, H, D] -> [B, T, H, D]
    varlen: Callable         # (q, k, v, cu_q, cu_k, max_q, max_k) packed [total, H, D] -> [total_q, H, D]
    with_kvcache: Callable | None  # (q, k_cache, v_cache, cache_seqlens, cache_leftpad) -> [B, T, H, D]


_FLASH_FUNCTIONS = ("flash_attn_func", "flash_attn_varlen_func")


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def flash_kernels() -> FlashKernels:
    """The installed flash-attn's kernels, or an AttentionBackendError that says why not. Not cached: after the
    first import this is a sys.modules lookup, and a cache would outlive a reinstall in the same process."""
    if _find_spec("flash_attn") is None:
        raise AttentionBackendError(
            "attention_backend='flash' needs flash-attn, which is not installed (gptneox's extra 'flash'; README, "
            "'GPU install': a prebuilt "
            f"wheel for torch {torch.__version__} / CUDA {torch.version.cuda}, or flash-attn-4 on Hopper); "
            "use 'flex' or 'sdpa' otherwise")
    module = _import_flash("flash_attn")
    if all(hasattr(module, name) for name in _FLASH_FUNCTIONS):
        return _flash_attn_2(module)
    if _find_spec("flash_attn.cute") is not None:
        cute = _import_flash("flash_attn.cute")
        if all(hasattr(cute, name) for name in _FLASH_FUNCTIONS):
            return _flash_attn_4(cute)
    where = getattr(module, "__file__", None) or list(getattr(module, "__path__", []))
    raise AttentionBackendError(
        f"attention_backend='flash': the installed flash_attn module ({where}) has neither "
        f"{' nor '.join(_FLASH_FUNCTIONS)} (flash-attn >= 2.5) nor a flash_attn.cute with them (flash-attn-4); "
        "reinstall flash-attn, or use 'flex' or 'sdpa'")


def _find_spec(name: str):
    """Whether `name` is installed, without importing it (a parent package is imported)."""
    if name in sys.modules:
        return sys.modules[name]  # None: marked as not importable
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent that is not a package, or one without a spec
        return None


def _import_flash(name: str):
    """Import a flash-attn module; a build that does not load says so, with the original error."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if "undefined symbol" in str(err):
            cause = (f"its compiled kernels were built for another torch or CUDA than this torch {torch.__version__} "
                     f"(CUDA {torch.version.cuda}); install the wheel built for them (README, 'GPU install')")
        else:
            cause = "it fails to import"
        raise AttentionBackendError(f"attention_backend='flash': flash-attn is installed but {cause}. "
                                    f"Import of {name} failed with: {type(err).__name__}: {err}") from err


def _flash_attn_2(module) -> FlashKernels:
    def dense(q, k, v):
        return module.flash_attn_func(q, k, v, causal=True, deterministic=_deterministic())

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        return module.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                             deterministic=_deterministic())

    def with_kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad):
        return module.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                              cache_leftpad=cache_leftpad, causal=True)

    version = getattr(module, "__version__", "?")
    return FlashKernels(f"flash-attn {version}", dense, varlen,
                        with_kvcache if hasattr(module, "flash_attn_with_kvcache") else None)


def _flash_attn_4(cute) -> FlashKernels:
    """flash_attn.cute returns (out, lse) where flash-attn 2 returns out; its keywords differ too."""
    def first(result):
        return result[0] if isinstance(result, tuple) else result

    def dense(q, k, v):
        return first(cute.flash_attn_func(q, k, v, causal=True, deterministic=_deterministic()))

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        return first(cute.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                                 max_seqlen_k=max_k, causal=True, deterministic=_deterministic()))

    return FlashKernels(f"flash-attn-4 (flash_attn.cute {getattr(cute, '__version__', '?')})", dense, varlen, None)


def check_flash_inputs(q: torch.Tensor) -> None:
    _check_flash_device(q.device, q.dtype)


def _check_flash_device(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        raise AttentionBackendError(
            f"attention_backend='flash' runs only on CUDA in float16/bfloat16, got {device.type} "
            f"{str(dtype).replace('torch.', '')}; use 'sdpa' (or 'flex') here")


def check_backend(backend: str, device: torch.device | str, dtype: torch.dtype, training: bool = False) -> str:
    """Whether `backend` can run on this device and dtype, checked when it is chosen (before any weight is read).
    Returns a one-line description of the kernels used; raises AttentionBackendError naming the fix."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise AttentionBackendError(f"attention_backend={backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "flash":
        _check_flash_device(device, dtype)
        return flash_kernels().name
    if backend == "flex":
        if training and device.type != "cuda":
            raise AttentionBackendError(f"attention_backend='flex' cannot train on {device.type}: torch "
                                        f"{torch.__version__} has no FlexAttention backward there; use 'sdpa'")
        return "FlexAttention for padding and packed rows, SDPA otherwise"
    return backend


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
