"""Packed and padded batches of the same conversations give the same loss sum, trained-token count and
gradients of every parameter, through the collator, the model (SDPA and eager attention) and the loss the
training loop uses. Conversations come from the bundled sample mix, tokenized by its bundled tokenizer."""
from __future__ import annotations

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.data import DialogueCollator, build_datasets, load_tokenizer
from gptneox.flops import batch_training_flops, conversation_lengths, flops_per_token, training_flops
from gptneox.training.config import load_section, repo_path
from gptneox.training.loss import batch_loss, masked_cross_entropy, model_inputs


@pytest.fixture(scope="module")
def sample_mix():
    section = load_section("sample-mix")
    train, _ = build_datasets(section["datasets"], cache_dir=repo_path(section["cache_dir"]), seed=0)
    return train, load_tokenizer(repo_path(section["tokenizer_path"]))


def small_model(vocab_size: int) -> GPTNeoX:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
    return GPTNeoX(config).train()


def assert_same_gradient(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to fp32 rounding. A bias gradient sums terms of the gradient's own magnitude over every position,
    so an element that cancels to near zero carries an error of eps times that magnitude, not of itself
    (seen: 1.5e-5 on a layer-0 bias element whose neighbours are ~89, at two threads only): the absolute
    tolerance scales with the tensor's largest element."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6 * scale, msg=name)


def loss_and_gradients(model: GPTNeoX, batch: dict, full_logits: bool = False):
    model.zero_grad(set_to_none=True)
    if full_logits:
        total, count = masked_cross_entropy(model(batch["input_ids"], **model_inputs(batch)), batch["targets"],
                                            batch["loss_mask"])
    else:
        total, count = batch_loss(model, batch, chunk_rows=64)
    total.backward()
    return total.detach(), int(count), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_batch_matches_padded_batch(sample_mix, backend):
    conversations, tokenizer = sample_mix
    chosen = conversations[::37][:8]
    # random windows on: both collators draw the same windows from the same seed, in the same order
    padded = DialogueCollator(tokenizer, max_length=96, random_offset_probability=1.0, seed=3)(chosen)
    packed = DialogueCollator(tokenizer, max_length=96, random_offset_probability=1.0, pack=True, seed=3)(chosen)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # some rows hold several conversations
    assert int(packed["segment_ids"].max()) >= 2
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())

    model = small_model(vocab_size=-(-tokenizer.get_vocab_size() // 16) * 16)
    model.attention_backend = backend
    padded_sum, padded_count, padded_grads = loss_and_gradients(model, padded)
    packed_sum, packed_count, packed_grads = loss_and_gradients(model, packed)
    assert packed_count == padded_count == int(padded["loss_mask"].sum()) > 0
    torch.testing.assert_close(packed_sum, padded_sum, rtol=1e-5, atol=1e-4)
    for name, grad in padded_grads.items():
        assert_same_gradient(packed_grads[name], grad, name)

    # and both equal the plain full-logits loss of the padded batch, as the reference computed it
    reference_sum, reference_count, reference_grads = loss_and_gradients(model, padded, full_logits=True)
    assert reference_count == padded_count
    torch.testing.assert_close(packed_sum, reference_sum, rtol=1e-5, atol=1e-4)
    for name, grad in reference_grads.items():
        assert_same_gradient(packed_grads[name], grad, name)


def test_packing_without_segments_would_differ(sample_mix):
    """The comparison above can fail: dropping segment_ids lets conversations see each other."""
    conversations, tokenizer = sample_mix
    chosen = conversations[::37][:8]
    packed = DialogueCollator(tokenizer, max_length=96, random_offset_probability=0.0, pack=True)(chosen)
    model = small_model(vocab_size=-(-tokenizer.get_vocab_size() // 16) * 16)
    separate, _, _ = loss_and_gradients(model, packed)
    merged, _, _ = loss_and_gradients(model, {k: v for k, v in packed.items() if k != "segment_ids"})
    assert abs(float(separate) - float(merged)) > 1e-3


def test_training_flops_count_the_same_work_for_both_layouts(sample_mix):
    conversations, tokenizer = sample_mix
    chosen = conversations[::37][:8]
    padded = DialogueCollator(tokenizer, max_length=96, random_offset_probability=0.0)(chosen)
    packed = DialogueCollator(tokenizer, max_length=96, random_offset_probability=0.0, pack=True)(chosen)
    padded_lengths = conversation_lengths(padded)
    packed_lengths = conversation_lengths(packed)
    assert sorted(packed_lengths) == sorted(padded_lengths)
    assert len(packed_lengths) == len(chosen) and packed["input_ids"].shape[0] < len(chosen)
    config = GPTNeoXConfig.from_name("pythia-70m")
    trained = int(padded["loss_mask"].sum())
    assert training_flops(config, packed_lengths, trained) == training_flops(config, padded_lengths, trained)
    assert batch_training_flops(config, packed) == batch_training_flops(config, padded)
    # every token trained: the per-token count of flops_per_token, summed over the conversations
    everything = sum(flops_per_token(config, n) * n for n in padded_lengths)
    assert training_flops(config, padded_lengths, sum(padded_lengths)) == pytest.approx(everything, rel=1e-12)
    head = 6 * config.vocab_size * config.hidden_size
    assert everything - training_flops(config, padded_lengths, trained) == head * (sum(padded_lengths) - trained)
