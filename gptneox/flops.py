"""Training FLOPs per token of a GPT-NeoX model, shared by the training log (MFU) and `bench/`.

The count is the usual "6N + attention" model-FLOPs estimate (Kaplan et al. 2020; PaLM appendix B):
forward + backward cost 6 FLOPs per weight per token, plus 12 x layers x hidden x seq_len for the
attention score and value matmuls. Recomputation from gradient checkpointing is deliberately not counted,
so MFU stays comparable between runs with and without it.
"""
from __future__ import annotations

from gptneox.config import GPTNeoXConfig


def non_embedding_parameters(config: GPTNeoXConfig) -> int:
    """Weights of the transformer blocks and the final LayerNorm (no input embedding, no output head)."""
    h, inner = config.hidden_size, config.intermediate_size
    attention = h * 3 * h + h * h + (3 * h + h if config.attention_bias else 0)
    mlp = h * inner + inner + inner * h + h
    layer_norms = 2 * (2 * h)
    per_layer = attention + mlp + layer_norms
    return config.num_hidden_layers * per_layer + 2 * h


def flops_per_token(config: GPTNeoXConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) to process one token in a sequence of `seq_len` tokens."""
    dense = 6 * non_embedding_parameters(config)
    head = 6 * config.vocab_size * config.hidden_size
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float(dense + head + attention)


def training_flops(config: GPTNeoXConfig, sequence_lengths: list[int], trained_tokens: int) -> float:
    """Model FLOPs (forward + backward) of training once on sequences of these lengths.

    What the work needs, whatever the batch layout: the blocks for every real token, attention within each
    sequence (12 x layers x hidden x length per token, as flops_per_token), and the LM head only for the
    `trained_tokens` whose logits the loss reads. Padding and prompt logits are not useful work, so a
    padded and a packed batch of the same conversations get the same count.
    """
    tokens = sum(sequence_lengths)
    attention = 12 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in sequence_lengths)
    return float(6 * non_embedding_parameters(config) * tokens + attention
                 + 6 * config.vocab_size * config.hidden_size * trained_tokens)


def conversation_lengths(batch: dict) -> list[int]:
    """Real-token length of each conversation of a collated batch, padded or packed."""
    real = batch["attention_mask"].bool()
    if "segment_ids" not in batch:
        return real.sum(1).tolist()
    return [int(((batch["segment_ids"][r] == s) & real[r]).sum())
            for r in range(real.shape[0]) for s in batch["segment_ids"][r][real[r]].unique().tolist()]


def batch_training_flops(config: GPTNeoXConfig, batch: dict) -> float:
    """training_flops of one collated batch (the training log's MFU numerator)."""
    return training_flops(config, conversation_lengths(batch), int(batch["loss_mask"].sum()))
