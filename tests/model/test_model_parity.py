"""Live parity with transformers.GPTNeoXForCausalLM (the oracle): logits, gradients, masks, and
checkpoints going both ways."""
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402

HF_TINY = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=96,
               max_position_embeddings=128, bos_token_id=0, eos_token_id=0)


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**HF_TINY, **overrides}))
    with torch.no_grad():  # make LayerNorms and biases non-trivial so they are really compared
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_state_dict(model):
    """The checkpoint layout on the Hub: legacy `embed_out` head name, no head when tied."""
    state = {k.replace("lm_head.", "embed_out."): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("embed_out.weight")
    return state


VARIANTS = [
    dict(use_parallel_residual=True, rotary_pct=0.25, tie_word_embeddings=False),
    dict(use_parallel_residual=False, rotary_pct=1.0, tie_word_embeddings=False),
    dict(use_parallel_residual=True, rotary_pct=1.0, tie_word_embeddings=True),
    dict(use_parallel_residual=False, rotary_pct=0.25, tie_word_embeddings=True, hidden_act="gelu_new"),
]
LAYOUTS = [("safetensors", 1), ("bin", 1), ("safetensors", 3), ("bin", 2)]


@pytest.mark.parametrize("variant, layout", list(zip(VARIANTS, LAYOUTS)), ids=lambda v: str(v))
def test_logits_and_gradients_match_transformers(tmp_path, checkpoint_writer, variant, layout):
    reference = hf_model(**variant)
    fmt, shards = layout
    directory = checkpoint_writer(tmp_path, reference.config.to_dict(), hf_state_dict(reference), fmt, shards)
    ours = GPTNeoX.from_pretrained(directory).eval()
    x = torch.randint(0, 96, (3, 19), generator=torch.Generator().manual_seed(5))
    targets = torch.roll(x, -1, dims=1)

    expected = reference(x).logits
    for backend in ("sdpa", "eager"):
        ours.attention_backend = backend
        assert (ours(x) - expected).abs().max() <= 1e-4, backend

    F.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(ours(x).flatten(0, 1), targets.flatten()).backward()
    ref_grads = {k.replace("lm_head.", "embed_out."): p.grad for k, p in reference.named_parameters()}
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_padding_and_positions_match_transformers():
    reference = hf_model()
    ours = GPTNeoX(GPTNeoXConfig.from_hf(reference.config.to_dict())).eval()
    ours.load_state_dict(hf_state_dict(reference))
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(x, attention_mask=mask, position_ids=positions).logits
        got = ours(x, attention_mask=mask, position_ids=positions)
    assert (got - expected)[mask.bool()].abs().max() <= 1e-4


def test_transformers_loads_our_save(tmp_path):
    for tied in (False, True):
        model = GPTNeoX(GPTNeoXConfig.from_name("tiny", tie_word_embeddings=tied, rotary_pct=0.5,
                                                rotary_emb_base=500.0)).eval()
        model.save_pretrained(tmp_path / str(tied), max_shard_size="100KB")
        reference, info = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / str(tied),
                                                                          output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert reference.config.rope_parameters["rope_theta"] == 500.0
        assert reference.config.rope_parameters["partial_rotary_factor"] == 0.5
        x = torch.randint(0, 1024, (2, 11))
        with torch.no_grad():
            assert (reference.eval()(x).logits - model(x)).abs().max() <= 1e-4


def test_transformers_reads_our_config(tmp_path):
    config = GPTNeoXConfig.from_name("stablelm-base-alpha-7b", hidden_act="gelu_fast")
    config.save(tmp_path)
    loaded = transformers.GPTNeoXConfig.from_pretrained(tmp_path)
    assert (loaded.hidden_size, loaded.num_attention_heads, loaded.vocab_size) == (6144, 48, 50432)
    assert loaded.rope_parameters["partial_rotary_factor"] == 0.25 and loaded.hidden_act == "gelu_fast"
    assert GPTNeoXConfig.from_hf(json.loads(loaded.to_json_string())) == config
