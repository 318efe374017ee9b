"""Generation: KV-cache decoding equals full recomputation, padding is invisible, sampling knobs do what
they say, and greedy output matches transformers token for token."""
from __future__ import annotations

import warnings

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.attention import AttentionBackendError, flash_kernels
from gptneox.generate import generate, left_pad, process_logits, seen_tokens

CPU_BACKENDS = ("sdpa", "eager")
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [23, 7], [70, 2, 45, 11]]
NEVER_STOP = ()


def make_model(seed=0, **overrides) -> GPTNeoX:
    """Tiny model with peaked logits (std 0.2 weights), so argmax is never a near tie."""
    torch.manual_seed(seed)
    config = dict(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                  intermediate_size=96, max_position_embeddings=96, rotary_pct=0.5, initializer_range=0.2,
                  eos_token_id=0, pad_token_id=1)
    return GPTNeoX(GPTNeoXConfig(**{**config, **overrides})).eval()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cached_decoding_gives_the_logits_of_a_full_forward(backend):
    model = make_model()
    model.attention_backend = backend
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1)
    extra = torch.randint(2, 128, (3, 5))
    full_ids = torch.cat([input_ids, extra], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(full_ids, position_ids=positions, attention_mask=full_mask)
        cache = model.new_kv_cache(3, full_ids.shape[1])
        T = input_ids.shape[1]
        steps = [model(input_ids, position_ids=positions[:, :T], attention_mask=mask, kv_cache=cache)]
        for i in range(T, full_ids.shape[1]):
            steps.append(model(full_ids[:, i:i + 1], position_ids=positions[:, i:i + 1],
                               attention_mask=full_mask[:, :i + 1], kv_cache=cache))
    cached = torch.cat(steps, dim=1)
    real = full_mask.bool()
    torch.testing.assert_close(cached[real], expected[real], atol=1e-5, rtol=1e-5)
    assert cache.length == full_ids.shape[1]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cached_and_uncached_generation_agree(backend):
    model = make_model()
    model.attention_backend = backend
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1)
    cached = generate(model, input_ids, mask, max_new_tokens=20, stop_token_ids=NEVER_STOP)
    uncached = generate(model, input_ids, mask, max_new_tokens=20, stop_token_ids=NEVER_STOP, use_cache=False)
    assert cached.shape == (3, input_ids.shape[1] + 20)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :input_ids.shape[1]], input_ids)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flash", "flex"])
def test_gpu_backends_match_sdpa_on_cuda(backend):
    if not torch.cuda.is_available():
        pytest.skip("flash-attn and compiled FlexAttention run on CUDA; the CPU backends are tested above")
    if backend == "flash":
        try:
            flash_kernels()
        except AttentionBackendError as err:
            pytest.skip(f"flash-attn is not usable here: {err}")
    model = make_model().to("cuda", torch.float16)
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1, device="cuda")
    reference = generate(model, input_ids, mask, max_new_tokens=16, stop_token_ids=NEVER_STOP)
    model.attention_backend = backend
    flash = generate(model, input_ids, mask, max_new_tokens=16, stop_token_ids=NEVER_STOP)
    new = slice(input_ids.shape[1], None)  # the copied prompt columns would inflate the agreement
    assert (flash[:, new] == reference[:, new]).float().mean() > 0.9  # fp16 kernels may flip a rare near tie


def test_left_padded_rows_decode_as_if_alone():
    model = make_model()
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1)
    batched = generate(model, input_ids, mask, max_new_tokens=16, stop_token_ids=NEVER_STOP)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=16, stop_token_ids=NEVER_STOP)
        assert torch.equal(batched[row, -16:], alone[0, -16:]), f"row {row}"


def test_rows_stop_at_a_stop_id_and_are_padded_after():
    model = make_model()
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1)
    free = generate(model, input_ids, mask, max_new_tokens=12, stop_token_ids=NEVER_STOP)
    T = input_ids.shape[1]
    stop = int(free[0, T + 3])  # row 0's fourth new token becomes a stop token
    stopped = generate(model, input_ids, mask, max_new_tokens=12, stop_token_ids=[stop], pad_token_id=99)
    for row in range(3):
        new = free[row, T:].tolist()
        cut = new.index(stop) + 1 if stop in new else len(new)
        assert stopped[row, T:T + cut].tolist() == new[:cut]
        assert (stopped[row, T + cut:] == 99).all()
    assert stopped.shape[1] == T + max(  # decoding ends once every row has stopped
        (free[r, T:].tolist().index(stop) + 1 if stop in free[r, T:].tolist() else 12) for r in range(3))


def test_default_stop_is_the_config_eos():
    model = make_model()
    free = generate(model, torch.tensor([PROMPTS[0]]), max_new_tokens=10, stop_token_ids=NEVER_STOP)
    eos = int(free[0, -7])
    model_with_eos = make_model(eos_token_id=eos)
    out = generate(model_with_eos, torch.tensor([PROMPTS[0]]), max_new_tokens=10)
    assert out[0, -1] == eos and out.shape[1] == free.shape[1] - 6


def test_seeded_sampling_is_reproducible():
    model = make_model()
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1)
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=2.0, stop_token_ids=NEVER_STOP)
    first = generate(model, input_ids, mask, seed=3, **kwargs)
    again = generate(model, input_ids, mask, seed=3, **kwargs)
    with_generator = generate(model, input_ids, mask, generator=torch.Generator().manual_seed(3), **kwargs)
    other = generate(model, input_ids, mask, seed=4, **kwargs)
    assert torch.equal(first, again) and torch.equal(first, with_generator)
    assert not torch.equal(first, other)
    greedy = generate(model, input_ids, mask, max_new_tokens=24, stop_token_ids=NEVER_STOP)
    assert not torch.equal(first, greedy)


@pytest.mark.parametrize("knob", [dict(top_k=1), dict(top_p=1e-4)])
def test_sampling_with_a_single_candidate_is_greedy(knob):
    model = make_model()
    input_ids, mask = left_pad(PROMPTS, pad_token_id=1)
    greedy = generate(model, input_ids, mask, max_new_tokens=16, stop_token_ids=NEVER_STOP)
    sampled = generate(model, input_ids, mask, max_new_tokens=16, stop_token_ids=NEVER_STOP,
                       do_sample=True, temperature=3.0, seed=0, **knob)
    assert torch.equal(sampled, greedy)


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept_k = process_logits(logits, None, do_sample=True, top_k=2).isfinite()
    assert kept_k.tolist() == [[False, True, False, True]]
    kept_p = process_logits(logits, None, do_sample=True, top_p=0.75).isfinite()  # 0.5 + 0.3 reaches 0.75
    assert kept_p.tolist() == [[False, True, False, True]]
    kept_p = process_logits(logits, None, do_sample=True, top_p=0.85).isfinite()  # needs the 0.15 too
    assert kept_p.tolist() == [[False, True, True, True]]
    scaled = process_logits(logits, None, do_sample=True, temperature=0.5)
    torch.testing.assert_close(scaled, logits / 0.5)


def test_repetition_penalty_shrinks_seen_logits_whatever_their_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, seen, do_sample=False, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_pad_id_used_as_a_real_prompt_token_counts_as_seen():
    """Whichever comes last, the padding or the real token, the real one marks the id as seen."""
    input_ids = torch.tensor([[1, 1, 5], [5, 1, 1]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    seen = seen_tokens(input_ids, mask, vocab_size=8)
    assert seen.nonzero().tolist() == [[0, 1], [0, 5], [1, 1], [1, 5]]


def test_repetition_penalty_changes_greedy_output_away_from_repeats():
    model = make_model()
    prompt = torch.tensor([PROMPTS[0]])
    plain = generate(model, prompt, max_new_tokens=32, stop_token_ids=NEVER_STOP)[0, 7:].tolist()
    penalized = generate(model, prompt, max_new_tokens=32, stop_token_ids=NEVER_STOP,
                         repetition_penalty=100.0)[0, 7:].tolist()
    assert len(set(plain)) < len(plain), "the random model is expected to repeat itself"
    assert len(set(penalized)) > len(set(plain))


def test_generation_runs_in_eval_mode_without_grad_and_restores_training():
    model = make_model().train()
    modes = []
    handle = model.register_forward_hook(lambda m, i, o: modes.append((m.training, torch.is_grad_enabled())))
    out = generate(model, torch.tensor([PROMPTS[1]]), max_new_tokens=3, stop_token_ids=NEVER_STOP)
    handle.remove()
    assert modes == [(False, False)] * 3
    assert model.training and not out.requires_grad


def test_prompt_longer_than_the_context_is_a_clear_error():
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match=r"prompt is 16 tokens, but the model's context is 16"):
        generate(model, torch.arange(2, 18)[None], max_new_tokens=1)


def test_max_new_tokens_is_clipped_to_the_context_with_a_warning():
    model = make_model(max_position_embeddings=16)
    input_ids, mask = left_pad([list(range(2, 12)), [5, 6]], pad_token_id=1)
    with pytest.warns(UserWarning, match=r"max_new_tokens=20 clipped to 6"):
        out = generate(model, input_ids, mask, max_new_tokens=20, stop_token_ids=NEVER_STOP)
    assert out.shape == (2, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_k=-1), "top_k must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(seed=1, generator=torch.Generator()), "either generator or seed"),
    (dict(attention_mask=torch.tensor([[1, 1, 0]])), "needs left padding"),
    (dict(attention_mask=torch.tensor([[1, 1]])), r"attention_mask has shape \(1, 2\)"),
])
def test_bad_arguments_are_named(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        generate(model, torch.tensor([[4, 5, 6]]), **kwargs)


# ------------------------------------------------------------------ parity with transformers

def hf_tiny_pair(tmp_path):
    """A random transformers GPT-NeoX and the same weights loaded by our from_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96,
        max_position_embeddings=160, rotary_pct=0.5, initializer_range=0.2, eos_token_id=0, bos_token_id=0,
        pad_token_id=1, tie_word_embeddings=False)
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    ours = GPTNeoX.from_pretrained(tmp_path)
    return transformers, hf, ours


def hf_greedy(transformers, hf, input_ids, mask, max_new_tokens):
    generation_config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=0, pad_token_id=1,
        bos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(input_ids, attention_mask=mask, generation_config=generation_config)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["single", "batched-left-padded"])
def test_greedy_matches_transformers_for_64_tokens(tmp_path, prompts):
    transformers, hf, ours = hf_tiny_pair(tmp_path)
    input_ids, mask = left_pad(prompts, pad_token_id=1)
    expected = hf_greedy(transformers, hf, input_ids, mask, 64)
    got = generate(ours, input_ids, mask, max_new_tokens=64, stop_token_ids=[0], pad_token_id=1)
    assert expected.shape[1] - input_ids.shape[1] > 16, "transformers stopped too early to compare"
    assert got.tolist() == expected.tolist()


def test_logit_processing_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.generation import logits_process as lp
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    history = torch.randint(0, 64, (4, 10))
    seen = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, history, True)
    expected = lp.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    expected = lp.TemperatureLogitsWarper(0.7)(history, expected)
    expected = lp.TopKLogitsWarper(20)(history, expected)
    expected = lp.TopPLogitsWarper(0.8)(history, expected)
    got = process_logits(logits, seen, do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                         repetition_penalty=1.3)
    assert torch.equal(got.isfinite(), expected.isfinite())
    torch.testing.assert_close(got[got.isfinite()], expected[expected.isfinite()])
