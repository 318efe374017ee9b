"""Attention backends, masks, packing, KV cache and checkpointing of our model (no transformers needed)."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from gptneox import attention as attention_module
from gptneox.model import LayerNorm, rotary_cos_sin

CPU_BACKENDS = ("sdpa", "eager", "flex")
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


def test_flash_needs_cuda_and_half_precision(tiny_model, fake_flash_modules):
    model = tiny_model()
    model.attention_backend = "flash"  # the package is there; device and dtype are checked at the forward
    with pytest.raises(attention_module.AttentionBackendError,
                       match="only on CUDA in float16/bfloat16, got cpu float32; use 'sdpa'"):
        logits(model, "flash", ids(1, 5))


def test_flash_missing_package_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes the import fail
    model = tiny_model()
    with pytest.raises(attention_module.AttentionBackendError, match="needs flash-attn, which is not installed \\(gptneox's extra 'flash'"):
        model.attention_backend = "flash"  # fails when chosen, before any forward
    assert model.attention_backend == "sdpa"


def test_flash_built_for_another_torch_says_so_with_the_original_error(tiny_model, monkeypatch):
    """What a wheel built against another torch raises: the message names the cause and keeps the error."""
    real_import = attention_module.importlib.import_module
    symbol = "flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c105ErrorC2E"

    def import_module(name, *args):
        if name == "flash_attn":
            raise ImportError(symbol)
        return real_import(name, *args)

    monkeypatch.setattr(attention_module, "_find_spec", lambda name: object())
    monkeypatch.setattr(attention_module.importlib, "import_module", import_module)
    with pytest.raises(attention_module.AttentionBackendError) as caught:
        tiny_model().attention_backend = "flash"
    message = str(caught.value)
    assert "built for another torch or CUDA" in message and symbol in message
    assert torch.__version__ in message


def test_flash_other_import_failure_is_not_called_missing(tiny_model, monkeypatch):
    monkeypatch.setattr(attention_module, "_find_spec", lambda name: object())
    monkeypatch.setattr(attention_module.importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ModuleNotFoundError("No module named 'einops'")))
    with pytest.raises(attention_module.AttentionBackendError,
                       match="installed but it fails to import.*No module named 'einops'"):
        tiny_model().attention_backend = "flash"


def test_flash_module_without_our_functions_fails_at_selection(tiny_model, monkeypatch):
    empty = types.ModuleType("flash_attn")
    empty.__path__ = []  # a package (e.g. a namespace left by a broken install) with no kernels
    monkeypatch.setitem(sys.modules, "flash_attn", empty)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    with pytest.raises(attention_module.AttentionBackendError,
                       match="has neither flash_attn_func nor flash_attn_varlen_func"):
        tiny_model().attention_backend = "flash"


def test_check_backend_at_config_time():
    check = attention_module.check_backend
    with pytest.raises(attention_module.AttentionBackendError, match="got cpu float32"):
        check("flash", "cpu", torch.float32)
    with pytest.raises(attention_module.AttentionBackendError, match="got cuda float32"):
        check("flash", "cuda", torch.float32)  # the dtype is refused before flash-attn is even looked for
    with pytest.raises(attention_module.AttentionBackendError, match="'flex' cannot train on cpu"):
        check("flex", "cpu", torch.float32, training=True)
    with pytest.raises(attention_module.AttentionBackendError, match="expected one of sdpa, eager, flash, flex"):
        check("xformers", "cpu", torch.float32)
    assert check("flex", "cpu", torch.float32) and check("sdpa", "cpu", torch.float16) == "sdpa"


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


def test_packed_rows_train_like_separate_sequences(tiny_model):
    """Packed SDPA (one call per segment on split views, gradients joined by cat) gives the weights the
    gradients of the same conversations run one at a time, and of eager over the packed rows."""
    model = tiny_model().train()
    lengths = [(5, 9, 2), (3, 4, 7, 2)]  # two rows of 16, the last segment of each stands for trailing padding
    parts = [[ids(1, n, seed=10 * r + s) for s, n in enumerate(row)] for r, row in enumerate(lengths)]
    rows = torch.cat([torch.cat(row, 1) for row in parts])
    segment_ids = torch.tensor([[s for s, n in enumerate(row) for _ in range(n)] for row in lengths])
    position_ids = torch.tensor([[t for n in row for t in range(n)] for row in lengths])

    def grads(backend, run):
        model.zero_grad()
        model.attention_backend = backend
        run()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    def packed():
        model(rows, position_ids=position_ids, segment_ids=segment_ids).square().sum().backward()

    def one_at_a_time():
        sum(model(part).square().sum() for row in parts for part in row).backward()

    reference = grads("sdpa", one_at_a_time)
    for backend in ("sdpa", "eager"):
        got = grads(backend, packed)
        for name, grad in reference.items():
            assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-5), (backend, name)
    # rows that see across segments train differently, so the comparison above can fail
    model.zero_grad()
    model(rows, position_ids=position_ids).square().sum().backward()
    assert not torch.allclose(model.gpt_neox.layers[0].attention.query_key_value.weight.grad,
                              reference["gpt_neox.layers.0.attention.query_key_value.weight"], atol=1e-3)


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
def _attend_causal(q, k, v):
    """[T, H, D], [S, H, D] -> [T, H, D], causal aligned bottom-right like flash-attn; a query with no key
    gets zeros, as flash-attn documents."""
    T, S = q.shape[0], k.shape[0]
    allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("hts,shd->thd", probs, v)


def _fake_flash_attn():
    """A stand-in for the flash_attn 2 package built on the eager math, to test our bookkeeping (index
    gathering, cu_seqlens, cache lengths and left padding, scatter back) on the CPU. The kernels themselves
    are tested on CUDA (make test-gpu)."""
    calls = []

    def flash_attn_func(q, k, v, causal=False, deterministic=False):
        assert causal is True  # the fake is always causal, so the call must ask for it
        calls.append("dense")
        return torch.stack([_attend_causal(q[b], k[b], v[b]) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, deterministic=False):
        assert causal is True and cu_q.dtype == cu_k.dtype == torch.int32
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        calls.append("varlen")
        outs = [_attend_causal(q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]])
                for i in range(len(cu_q) - 1)]
        return torch.cat(outs)

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_leftpad=None, causal=False):
        """Row b's keys are k_cache[b, leftpad[b]:cache_seqlens[b]] (flash-attn's BlockInfo)."""
        assert causal is True and cache_seqlens.dtype == torch.int32 and cache_seqlens.shape == (q.shape[0],)
        assert cache_leftpad is None or cache_leftpad.dtype == torch.int32
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        calls.append("kvcache")
        starts = torch.zeros_like(cache_seqlens) if cache_leftpad is None else cache_leftpad
        return torch.stack([_attend_causal(q[b], k_cache[b, starts[b]:cache_seqlens[b]],
                                           v_cache[b, starts[b]:cache_seqlens[b]]) for b in range(q.shape[0])])

    module = types.ModuleType("flash_attn")
    module.__version__ = "2.8.3-fake"
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    module.calls = calls
    return module


def _fake_flash_attn_4():
    """flash-attn-4's layout: an empty `flash_attn` package and `flash_attn.cute` whose functions return
    (out, lse) and take the varlen lengths by keyword."""
    v2 = _fake_flash_attn()
    cute = types.ModuleType("flash_attn.cute")

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, deterministic=False):
        return v2.flash_attn_func(q, k, v, causal=causal), None

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               causal=False, deterministic=False):
        return v2.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         causal=causal), None

    cute.flash_attn_func, cute.flash_attn_varlen_func, cute.calls = flash_attn_func, flash_attn_varlen_func, v2.calls
    package = types.ModuleType("flash_attn")
    package.__path__ = []
    package.cute = cute
    return package, cute


@pytest.fixture
def fake_flash_modules(monkeypatch):
    module = _fake_flash_attn()
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attention_module, "_find_spec", lambda name: object() if name in sys.modules else None)
    return module


@pytest.fixture
def fake_flash(fake_flash_modules, monkeypatch):
    monkeypatch.setattr(attention_module, "check_flash_inputs", lambda q: None)
    return fake_flash_modules


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
    _left_padded_decoding_matches_eager(model, device, atol)


def _left_padded_decoding_matches_eager(model, device, atol):
    """A left-padded prefill into the cache, then one token at a time: the path generate() takes."""
    short, long = ids(1, 4, seed=8).to(device), ids(1, 7, seed=9).to(device)
    nxt = ids(2, 3, seed=10).to(device)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long, device=device), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    outputs = {}
    for backend in ("flash", "eager"):
        cache = model.new_kv_cache(2, 10)
        step_mask = mask
        steps = [logits(model, backend, batch, attention_mask=step_mask, position_ids=positions, kv_cache=cache)[:, 3:]]
        for t in range(3):
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long, device=device)], 1)
            steps.append(logits(model, backend, nxt[:, t:t + 1], attention_mask=step_mask,
                                position_ids=positions[:, -1:] + 1 + t, kv_cache=cache))
        outputs[backend] = torch.cat(steps, 1).float()
    assert torch.allclose(outputs["flash"], outputs["eager"], atol=atol)


def test_flash_bookkeeping_padding_segments_and_cache(tiny_model, fake_flash):
    model = tiny_model()
    _flash_matches_eager(model, "cpu", ATOL)
    # padding and segments went through varlen (once per layer); the cache cases through the cache kernel
    assert fake_flash.calls.count("varlen") == 2 * model.config.num_hidden_layers and "kvcache" in fake_flash.calls


def test_flash_decoding_uses_the_cache_kernel_without_syncing_per_layer(tiny_model, fake_flash):
    model = tiny_model()
    model.attention_backend = "flash"
    cache = model.new_kv_cache(2, 10)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    model(ids(2, 4), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), kv_cache=cache)
    fake_flash.calls.clear()
    model(ids(2, 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
          position_ids=torch.tensor([[2], [4]]), kv_cache=cache)
    assert fake_flash.calls == ["kvcache"] * model.config.num_hidden_layers


def test_flash_attn_4_is_used_where_flash_attn_2_is_absent(tiny_model, monkeypatch):
    package, cute = _fake_flash_attn_4()
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setattr(attention_module, "_find_spec", lambda name: object() if name in sys.modules else None)
    monkeypatch.setattr(attention_module, "check_flash_inputs", lambda q: None)
    assert attention_module.flash_kernels().name.startswith("flash-attn-4")
    assert attention_module.flash_kernels().with_kvcache is None
    model = tiny_model()
    _flash_matches_eager(model, "cpu", ATOL)  # its cache cases fall back to SDPA
    assert cute.calls == ["varlen"] * (2 * model.config.num_hidden_layers)
    x = ids(2, 12)
    assert torch.allclose(logits(model, "flash", x), logits(model, "eager", x), atol=ATOL)
    assert cute.calls[-1] == "dense"  # plain causal rows: its tuple-returning dense kernel


def test_sdpa_packed_rows_use_torch_varlen_where_it_runs(tiny_model, monkeypatch):
    """On CUDA in fp16/bf16 packed rows go through torch's varlen kernel; here its stand-in checks the call."""
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append(cu_q.tolist())
        return _fake_flash_attn().flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)

    model = tiny_model()
    x = ids(2, 12)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(3)) + list(range(4)) + list(range(5))])
    reference = logits(model, "eager", x, position_ids=positions, segment_ids=segments)
    monkeypatch.setattr(attention_module, "torch_varlen_usable", lambda q: True)
    monkeypatch.setattr(attention_module, "torch_varlen_attention", fake_varlen)
    out = logits(model, "sdpa", x, position_ids=positions, segment_ids=segments)
    assert torch.allclose(out, reference, atol=ATOL)
    assert calls and calls[0] == [0, 5, 12, 15, 19, 24]


# ----------------------------------------------------------------------------- FlexAttention
def test_flex_matches_eager_for_padding_and_packed_rows(tiny_model):
    """torch 2.13 runs FlexAttention's forward uncompiled on the CPU (no backward there): its block mask
    must give the eager reference's logits for left and right padding and for packed rows."""
    model = tiny_model()
    x = ids(2, 12)
    for mask in (torch.tensor([[0, 0, 0] + [1] * 9, [1] * 12]), torch.tensor([[1] * 8 + [0] * 4, [1] * 12])):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = logits(model, "flex", x, attention_mask=mask, position_ids=positions)
        ref = logits(model, "eager", x, attention_mask=mask, position_ids=positions)
        assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=ATOL)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(3)) + list(range(4)) + list(range(5))])
    out = logits(model, "flex", x, position_ids=positions, segment_ids=segments)
    assert torch.allclose(out, logits(model, "eager", x, position_ids=positions, segment_ids=segments), atol=ATOL)
    # and the segments are honoured: without them the later segments see the earlier ones
    assert not torch.allclose(out, logits(model, "eager", x, position_ids=positions), atol=1e-3)


def test_flex_block_mask_is_built_once_per_forward(tiny_model, monkeypatch):
    import torch.nn.attention.flex_attention as flex_module
    built = []
    real = flex_module.create_block_mask
    monkeypatch.setattr(flex_module, "create_block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    model = tiny_model()
    logits(model, "flex", ids(1, 10), segment_ids=torch.tensor([[0] * 4 + [1] * 6]),
           position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]))
    assert built == [1]  # shared by both layers


def test_flex_decoding_goes_through_sdpa(tiny_model):
    model = tiny_model()
    _left_padded_decoding_matches_eager_for(model, "flex")


def _left_padded_decoding_matches_eager_for(model, backend):
    short, long = ids(1, 4, seed=8), ids(1, 7, seed=9)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    results = []
    for name in (backend, "eager"):
        cache = model.new_kv_cache(2, 10)
        first = logits(model, name, batch, attention_mask=mask, position_ids=positions, kv_cache=cache)[:, 3:]
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        second = logits(model, name, ids(2, 1, seed=4), attention_mask=step_mask, position_ids=positions[:, -1:] + 1,
                        kv_cache=cache)
        results.append(torch.cat([first, second], 1))
    assert torch.allclose(results[0], results[1], atol=ATOL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn kernels need a CUDA GPU")
def test_flash_kernels_on_cuda(tiny_model):
    try:
        attention_module.flash_kernels()
    except attention_module.AttentionBackendError as err:
        pytest.skip(f"flash-attn is not usable here: {err}")
    model = tiny_model().cuda().half()
    x = ids(2, 12).cuda()
    assert torch.allclose(logits(model, "flash", x).float(), logits(model, "eager", x).float(), atol=2e-2)
    _flash_matches_eager(model, "cuda", 2e-2)


def test_compile_blocks_keeps_parameter_names(tiny_model):
    """nn.Module.compile wraps each block in place: no `_orig_mod.` prefix, so checkpoints and HF names hold."""
    model = tiny_model()
    names = list(model.state_dict())
    model.compile_blocks()
    assert list(model.state_dict()) == names
    assert all(block._compiled_call_impl is not None for block in model.gpt_neox.layers)


def test_flex_widths_fall_in_few_buckets():
    flex_width = attention_module.flex_width
    """Compiled FlexAttention has static shapes: rows are padded to 2^k or 1.5 * 2^k tokens (at least 128)."""
    assert [flex_width(n) for n in (1, 128, 129, 192, 193, 300, 1000, 2049, 4097)] == \
        [128, 128, 192, 192, 256, 384, 1024, 3072, 6144]
    assert len({flex_width(n) for n in range(1, 32769)}) == 17  # 128, 192, 256, ..., 24576, 32768
    assert all(n <= flex_width(n) < 1.5 * n + 1 for n in range(128, 5000))


def test_flex_rows_padded_to_their_bucket_match_eager(tiny_model):
    """A packed row of 130 tokens runs padded to 192: the extra keys are masked, the extra queries dropped."""
    model = tiny_model()
    segments = torch.tensor([[0] * 70 + [1] * 60])
    positions = torch.tensor([list(range(70)) + list(range(60))])
    x = ids(1, 130)
    assert torch.allclose(logits(model, "flex", x, segment_ids=segments, position_ids=positions),
                          logits(model, "eager", x, segment_ids=segments, position_ids=positions), atol=ATOL)
