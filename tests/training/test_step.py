"""One optimizer step without DeepSpeed (the engine-level tests are in test_loop.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.training.loss import masked_cross_entropy, masked_cross_entropy_from_hidden
from gptneox.training.step import train_step


def test_masked_loss_is_sum_and_count_of_trained_tokens():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    total, count = masked_cross_entropy(logits, targets, mask)
    assert count.item() == 4
    expected = sum(F.cross_entropy(logits[b, t][None], targets[b, t][None]) for b, t in mask.nonzero().tolist())
    torch.testing.assert_close(total, expected)
    hidden, head = torch.randn(2, 5, 7), torch.randn(11, 7)
    from_hidden, n = masked_cross_entropy_from_hidden(hidden, head, targets, mask)
    torch.testing.assert_close(from_hidden, masked_cross_entropy(hidden @ head.t(), targets, mask)[0])
    empty, zero = masked_cross_entropy(logits, targets, torch.zeros_like(mask))
    assert zero.item() == 0 and empty.item() == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_cross_entropy(logits, targets[:, :4], mask[:, :4])


class _PlainEngine:
    """The part of a DeepSpeed engine that train_step uses, over a plain module with plain autograd."""

    def __init__(self, module):
        self.module, self.device, self.skipped_steps = module, torch.device("cpu"), 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self):
        return 1

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_lr(self):
        return [0.0]

    def get_global_grad_norm(self):
        return None

    def fp16_enabled(self):
        return False


def test_an_empty_micro_batch_still_gives_every_parameter_a_zero_gradient():
    """ZeRO-2 reduces the gradients a backward reaches: every rank must reach the same ones, all of them."""
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
    empty = {k: torch.zeros((0, 0), dtype=torch.long) for k in ("input_ids", "targets", "attention_mask",
                                                              "position_ids")}
    result = train_step(_PlainEngine(model), [{**empty, "loss_mask": torch.zeros((0, 0), dtype=torch.bool)}])
    assert result.loss == 0.0 and result.trained_tokens == 0
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_an_empty_micro_batch_in_fp16_logs_zero_not_nan():
    """The stand-in's sum over the output embedding is 65536 here, past fp16's 65504: summed in fp16 it is inf,
    and inf * 0 is NaN in the logged loss and in every gradient."""
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny")).half()
    with torch.no_grad():
        model.output_embedding.fill_(1.0)  # 1024 x 64 ones
    assert torch.isinf(model.output_embedding.sum())
    empty = {k: torch.zeros((0, 0), dtype=torch.long) for k in ("input_ids", "targets", "attention_mask",
                                                              "position_ids")}
    result = train_step(_PlainEngine(model), [{**empty, "loss_mask": torch.zeros((0, 0), dtype=torch.bool)}])
    assert result.loss == 0.0
    assert all(not p.grad.isnan().any() for p in model.parameters())
