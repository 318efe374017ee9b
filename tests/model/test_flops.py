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


def test_flops_per_token_against_published_parameter_counts():
    pythia = GPTNeoXConfig.from_name("pythia-70m")
    assert non_embedding_parameters(pythia) == 18_915_328  # Pythia paper, table 1 (non-embedding params)
    # 6 x 18,915,328 + 6 x 50,304 vocab x 512 hidden + 12 x 6 layers x 512 x 2048 tokens
    assert flops_per_token(pythia, 2048) == 113_491_968 + 154_533_888 + 75_497_472
    stablelm = GPTNeoXConfig.from_name("stablelm-base-alpha-7b")
    assert 6.8e9 < non_embedding_parameters(stablelm) + 2 * 50432 * 6144 < 7.9e9  # "7B" with both embeddings
    assert flops_per_token(stablelm, 2048) < flops_per_token(stablelm, 4096)  # attention grows with the sequence
