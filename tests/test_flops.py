"""flops_per_token: the non-embedding parameter count it rests on must match the real model."""
from __future__ import annotations

import pytest

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.flops import flops_per_token, non_embedding_parameters


@pytest.mark.parametrize("overrides", [{}, {"attention_bias": False}])
def test_non_embedding_parameters_match_the_model(overrides):
    config = GPTNeoXConfig.from_name("tiny", **overrides)
    model = GPTNeoX(config)
    embeddings = model.gpt_neox.embed_in.weight.numel() + model.embed_out.weight.numel()
    assert non_embedding_parameters(config) == sum(p.numel() for p in model.parameters()) - embeddings


def test_flops_per_token_formula_on_stablelm_7b():
    config = GPTNeoXConfig.from_name("stablelm-base-alpha-7b")
    n = non_embedding_parameters(config)
    assert 6.8e9 < n + 2 * 50432 * 6144 < 7.9e9  # "7B" including both embedding matrices
    expected = 6 * n + 6 * 50432 * 6144 + 12 * 16 * 6144 * 4096
    assert flops_per_token(config, 4096) == expected
    assert flops_per_token(config, 2048) < expected  # the attention term scales with the sequence
