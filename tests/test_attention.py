"""Attention backends, masks, packing, KV cache and checkpointing of our model (no transformers needed)."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from gptneox import attention as attention_module
from gptneox.model import LayerNorm, rotary_cos_sin

CPU_BACKENDS = ("sdpa", "eager")
ATOL = 1e-5


def ids(batch, length, seed=1, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, backend, *args, **kwargs):
    model.attention_backend = backend
    return model(*args, **kwargs)


@pytest.mark.parametrize("parallel", [True, False])
def test_backends_agree(tiny_model, parallel):
    model = tiny_model(use_parallel_residual=parallel)
    x = ids(3, 21)
    reference = logits(model, "eager", x)
    assert torch.allclose(logits(model, "sdpa", x), reference, atol=ATOL)


def test_unknown_backend_rejected(tiny_model):
    with pytest.raises(ValueError, match="attention_backend='xformers'"):
        tiny_model().attention_backend = "xformers"


def test_flash_needs_cuda_and_half_precision(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    model = tiny_model()
    with pytest.raises(RuntimeError, match="only on CUDA in float16/bfloat16, got cpu torch.float32"):
        logits(model, "flash", ids(1, 5))


def test_flash_missing_package_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes the import fail
    model = tiny_model()
    with pytest.raises(RuntimeError, match="needs the flash-attn package"):
        model.attention_backend = "flash"  # fails when chosen, before any forward
    assert model.attention_backend == "sdpa"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_left_and_right_padding_match_unpadded_rows(tiny_model, backend):
    model = tiny_model()
    short, long = ids(1, 7, seed=2), ids(1, 12, seed=3)
    alone_short, alone_long = logits(model, backend, short), logits(model, backend, long)
    pad = torch.zeros(1, 5, dtype=torch.long)
    # right padding
    batch = torch.cat([torch.cat([short, pad], 1), long])
    mask = torch.cat([torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], 1), torch.ones(1, 12)]).long()
    out = logits(model, backend, batch, attention_mask=mask)
    assert torch.allclose(out[0, :7], alone_short[0], atol=ATOL)
    assert torch.allclose(out[1], alone_long[0], atol=ATOL)
    # left padding: positions must continue from 0 at the first real token
    batch = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1), torch.ones(1, 12)]).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    out = logits(model, backend, batch, attention_mask=mask, position_ids=position_ids)
    assert torch.allclose(out[0, 5:], alone_short[0], atol=ATOL)
    assert torch.allclose(out[1], alone_long[0], atol=ATOL)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_row_equals_separate_sequences(tiny_model, backend):
    model = tiny_model()
    parts = [ids(1, n, seed=s) for n, s in ((5, 4), (9, 5), (3, 6))]
    row = torch.cat(parts, 1)
    segment_ids = torch.cat([torch.full((1, p.shape[1]), i) for i, p in enumerate(parts)], 1)
    position_ids = torch.cat([torch.arange(p.shape[1]) for p in parts])[None]
    packed = logits(model, backend, row, position_ids=position_ids, segment_ids=segment_ids)
    start = 0
    for part in parts:
        alone = logits(model, backend, part)
        assert torch.allclose(packed[0, start:start + part.shape[1]], alone[0], atol=ATOL)
        start += part.shape[1]
    # without segment_ids the later segments see the earlier ones, so the test above is not vacuous
    unsegmented = logits(model, backend, row, position_ids=position_ids)
    assert not torch.allclose(unsegmented[0, 5:14], packed[0, 5:14], atol=1e-3)


def test_reused_segment_id_in_a_later_run_is_a_new_segment(tiny_model):
    model = tiny_model()
    row = ids(1, 8)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    a = logits(model, "sdpa", row, position_ids=positions, segment_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]))
    b = logits(model, "sdpa", row, position_ids=positions, segment_ids=torch.tensor([[7, 7, 7, 7, 3, 3, 3, 3]]))
    c = logits(model, "sdpa", row, position_ids=positions, segment_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 0, 0]]))
    assert torch.allclose(a, b, atol=ATOL)
    assert not torch.allclose(a[0, 6:], logits(model, "sdpa", row[:, 6:])[0], atol=1e-3)
    assert torch.allclose(c[0, 6:], logits(model, "sdpa", row[:, 6:])[0], atol=ATOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_incremental_equals_full_forward(tiny_model, backend):
    model = tiny_model()
    x = ids(2, 14)
    full = logits(model, backend, x)
    cache = model.new_kv_cache(batch_size=2, max_length=20)
    chunks = [logits(model, backend, x[:, :6], kv_cache=cache)]      # prefill
    chunks.append(logits(model, backend, x[:, 6:9], kv_cache=cache))  # a multi-token chunk
    for t in range(9, 14):                                             # token by token
        chunks.append(logits(model, backend, x[:, t:t + 1], kv_cache=cache))
    assert cache.length == 14
    assert torch.allclose(torch.cat(chunks, 1), full, atol=ATOL)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_with_left_padding(tiny_model, backend):
    model = tiny_model()
    short, long = ids(1, 4, seed=8), ids(1, 7, seed=9)
    nxt = ids(2, 3, seed=10)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    cache = model.new_kv_cache(2, 10)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits(model, backend, batch, attention_mask=mask, position_ids=positions, kv_cache=cache)
    outs = []
    for t in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step_positions = positions[:, -1:] + 1 + t
        outs.append(logits(model, backend, nxt[:, t:t + 1], attention_mask=mask, position_ids=step_positions,
                           kv_cache=cache))
    outs = torch.cat(outs, 1)
    assert torch.allclose(outs[0], logits(model, backend, torch.cat([short, nxt[:1]], 1))[0, 4:], atol=ATOL)
    assert torch.allclose(outs[1], logits(model, backend, torch.cat([long, nxt[1:]], 1))[0, 7:], atol=ATOL)


def test_kv_cache_errors(tiny_model):
    model = tiny_model()
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="kv_cache is full: 0 cached \\+ 5 new tokens > max_length 4"):
        model(ids(1, 5), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache holds batch 1, input_ids has batch 2"):
        model(ids(2, 2), kv_cache=cache)
    cache = model.new_kv_cache(1, 8)
    model(ids(1, 1), kv_cache=cache)
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 2\\), expected \\(1, 3\\)"):
        model(ids(1, 2), kv_cache=cache, attention_mask=torch.ones(1, 2))


def test_gradient_checkpointing_gives_same_gradients(tiny_model):
    model = tiny_model().train()
    x = ids(2, 16)

    block_runs = []
    model.gpt_neox.layers[0].register_forward_pre_hook(lambda *_: block_runs.append(1))

    def grads(checkpointing):
        model.zero_grad()
        block_runs.clear()
        model.gradient_checkpointing = checkpointing
        F.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        assert len(block_runs) == (2 if checkpointing else 1)  # checkpointing recomputes the block in backward
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_return_hidden_and_output_embedding(tiny_model):
    model = tiny_model()
    x = ids(2, 6)
    hidden = model(x, return_hidden=True)
    assert hidden.shape == (2, 6, 48)
    assert torch.allclose(hidden @ model.output_embedding.T, model(x), atol=ATOL)
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.output_embedding is tied.gpt_neox.embed_in.weight


def test_layer_norm_statistics_in_fp32():
    """The model's LayerNorm on bf16 input must equal the fp32 computation rounded once to bf16."""
    x = (torch.randn(4, 64) * 30 + 1000).bfloat16()  # large mean: bf16 statistics would be badly off
    norm = LayerNorm(64).bfloat16()
    expected = F.layer_norm(x.float(), (64,)).bfloat16()
    assert torch.equal(norm(x), expected)


def test_rotary_angles_computed_in_fp32(tiny_model):
    config = tiny_model().config
    positions = torch.tensor([[4095, 4096, 4097]])
    cos, _ = rotary_cos_sin(positions, config, torch.float16)
    cos32, _ = rotary_cos_sin(positions, config, torch.float32)
    assert torch.equal(cos, cos32.half())  # fp16 positions would collapse 4095..4097 onto 4096
    assert not torch.equal(cos32[0, 0], cos32[0, 1])


def test_eager_scores_in_fp32_do_not_overflow_in_fp16():
    """q.k of 8 * 100 * 100 = 80000 is past fp16's 65504: fp16 scores would be inf and the softmax NaN."""
    q = torch.full((1, 4, 2, 8), 100.0, dtype=torch.float16)
    v = torch.randn(1, 4, 2, 8, generator=torch.Generator().manual_seed(0)).half()
    mask = attention_module.AttentionMask(1, 4, 4)
    out = attention_module.attend(q, q, v, mask, "eager")
    expected = attention_module.attend(q.float(), q.float(), v.float(), mask, "eager")
    assert torch.isfinite(out).all() and torch.allclose(out.float(), expected, atol=1e-2)


# ----------------------------------------------------------------------------- flash-attn
def _fake_flash_attn():
    """A stand-in for the flash_attn package built on the eager math, to test our varlen bookkeeping
    (index gathering, cu_seqlens, scatter back) on the CPU. The kernels themselves are tested on CUDA."""

    def attend_causal(q, k, v):  # [T, H, D], [S, H, D]; bottom-right aligned like flash-attn
        T, S = q.shape[0], k.shape[0]
        allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
        scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
        return torch.einsum("hts,shd->thd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)

    def flash_attn_func(q, k, v, causal=False):
        assert causal is True  # the fake is always causal, so the call must ask for it
        return torch.stack([attend_causal(q[b], k[b], v[b]) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        assert causal is True and cu_q.dtype == cu_k.dtype == torch.int32
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        outs = [attend_causal(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]])
                for i in range(len(cu_q) - 1)]
        return torch.cat(outs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


@pytest.fixture
def fake_flash(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn())
    monkeypatch.setattr(attention_module, "check_flash_inputs", lambda q: None)


def _flash_matches_eager(model, device, atol):
    """Left padding, packed segments, and prefill + decode through a cache: flash against the eager math."""
    x = ids(2, 12).to(device)
    mask = torch.ones(2, 12, dtype=torch.long, device=device)
    mask[0, :3] = 0  # left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = logits(model, "flash", x, attention_mask=mask, position_ids=positions).float()
    ref = logits(model, "eager", x, attention_mask=mask, position_ids=positions).float()
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=atol)

    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5], device=device)
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(3)) + list(range(4)) + list(range(5))],
                             device=device)
    out = logits(model, "flash", x, position_ids=positions, segment_ids=segments).float()
    ref = logits(model, "eager", x, position_ids=positions, segment_ids=segments).float()
    assert torch.allclose(out, ref, atol=atol)

    cache = model.new_kv_cache(2, 16)
    first = logits(model, "flash", x[:, :8], kv_cache=cache)
    rest = logits(model, "flash", x[:, 8:], kv_cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1).float(), logits(model, "eager", x).float(), atol=atol)


def test_flash_bookkeeping_padding_segments_and_cache(tiny_model, fake_flash):
    _flash_matches_eager(tiny_model(), "cpu", ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn kernels need a CUDA GPU")
def test_flash_kernels_on_cuda(tiny_model):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    model = tiny_model().cuda().half()
    x = ids(2, 12).cuda()
    assert torch.allclose(logits(model, "flash", x).float(), logits(model, "eager", x).float(), atol=2e-2)
    _flash_matches_eager(model, "cuda", 2e-2)
