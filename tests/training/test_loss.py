"""The chunked, trained-rows-only cross-entropy: same sum, count and gradients as the plain full-logits loss,
and no [trained tokens, vocab] tensor ever created (checked by recording every tensor the ops produce)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptneox.training.loss import (masked_cross_entropy, masked_cross_entropy_from_hidden, masked_loss_and_correct,
                                   with_rows)

VOCAB, HIDDEN = 300, 24


def make_inputs(dtype=torch.float32, batch=3, length=20, seed=0, trained=0.6):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, HIDDEN, generator=generator).to(dtype).requires_grad_()
    head = (0.3 * torch.randn(VOCAB, HIDDEN, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.rand(batch, length, generator=generator) < trained
    return hidden, head, targets, mask


def loss_and_grads(fn, hidden, head, targets, mask, scale=1.0):
    hidden.grad = head.grad = None
    total, count = fn(hidden, head, targets, mask)
    (total * scale).backward()
    return total.detach(), count, hidden.grad.clone(), head.grad.clone()


def plain(hidden, head, targets, mask):
    return masked_cross_entropy(hidden @ head.t(), targets, mask)


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 10_000])
def test_same_loss_and_gradients_as_full_logits(chunk_rows):
    inputs = make_inputs()
    assert 0 < inputs[3].sum() < inputs[3].numel()
    expected = loss_and_grads(plain, *inputs, scale=0.37)
    chunked = loss_and_grads(lambda *a: masked_cross_entropy_from_hidden(*a, chunk_rows=chunk_rows), *inputs,
                             scale=0.37)
    assert chunked[1].item() == expected[1].item() == inputs[3].sum().item()
    torch.testing.assert_close(chunked[0], expected[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked[2], expected[2], rtol=1e-5, atol=1e-6)  # w.r.t. hidden states
    torch.testing.assert_close(chunked[3], expected[3], rtol=1e-5, atol=1e-6)  # w.r.t. the head weight
    untrained = ~inputs[3]
    assert chunked[2][untrained].abs().max() == 0  # untrained positions get no gradient


def test_half_precision_follows_the_full_logits_computation():
    """bf16 keeps gradients from the forward; fp16 recomputes them in backward under the loss scale."""
    for dtype, scale in ((torch.bfloat16, 1.0), (torch.float16, 2.0 ** 8)):
        inputs = make_inputs(dtype)
        expected = loss_and_grads(plain, *inputs, scale=scale)
        chunked = loss_and_grads(lambda *a: masked_cross_entropy_from_hidden(*a, chunk_rows=8), *inputs,
                                 scale=scale)
        assert chunked[0].dtype == torch.float32 and chunked[2].dtype == chunked[3].dtype == dtype
        torch.testing.assert_close(chunked[0], expected[0], rtol=1e-2, atol=1e-2)
        for ours, theirs in zip(chunked[2:], expected[2:]):
            assert torch.isfinite(theirs).all() and torch.isfinite(ours).all()
            torch.testing.assert_close(ours.float(), theirs.float(), rtol=3e-2, atol=3e-2 * theirs.float().abs().max())


def test_fp16_gradients_of_rare_tokens_survive_the_loss_scale():
    """Probabilities below fp16's range would flush to 0 if rounded before the loss scale is applied."""
    hidden = torch.zeros(1, 1, HIDDEN, dtype=torch.float16, requires_grad=True)
    head = torch.zeros(VOCAB, HIDDEN, dtype=torch.float16)
    with torch.no_grad():
        hidden[..., 0] = 1.0
        head[0, 0] = 18.0  # p(token 0) ~ 1, every other token ~ e^-18 / ... ~ 1.5e-8 (fp16 subnormal: 6e-8)
    head.requires_grad_()
    total, _ = masked_cross_entropy_from_hidden(hidden, head, torch.zeros(1, 1, dtype=torch.long),
                                                torch.ones(1, 1, dtype=torch.bool))
    (total * 2.0 ** 16).backward()
    assert (head.grad[1:, 0] > 0).all()  # every rare token's row still gets its (scaled) gradient


def test_all_masked_batch_gives_zero_sum_zero_count_and_zero_gradients():
    hidden, head, targets, mask = make_inputs()
    total, count, grad_hidden, grad_head = loss_and_grads(masked_cross_entropy_from_hidden, hidden, head, targets,
                                                          torch.zeros_like(mask))
    assert total.item() == 0.0 and count.item() == 0
    assert torch.isfinite(grad_hidden).all() and grad_hidden.abs().max() == 0 and grad_head.abs().max() == 0


def test_frozen_head_or_frozen_hidden():
    hidden, head, targets, mask = make_inputs()
    expected_hidden_grad = loss_and_grads(plain, hidden, head, targets, mask)[2]
    frozen_head = head.detach()
    total, _ = masked_cross_entropy_from_hidden(hidden, frozen_head, targets, mask, chunk_rows=5)
    hidden.grad = None
    total.backward()
    torch.testing.assert_close(hidden.grad, expected_hidden_grad, rtol=1e-5, atol=1e-6)
    recorder = LargestTensors()
    with torch.no_grad(), recorder:
        no_grad_total, _ = masked_cross_entropy_from_hidden(hidden, head, targets, mask)
    torch.testing.assert_close(no_grad_total, total.detach(), rtol=1e-6, atol=1e-5)
    products = [shape for name, shape in recorder.ops if "mm" in name]
    assert products and (VOCAB, HIDDEN) not in products  # evaluation forms no weight gradient


def test_second_backward_is_an_error_not_a_wrong_gradient():
    hidden, head, targets, mask = make_inputs()
    total, _ = masked_cross_entropy_from_hidden(hidden, head, targets, mask)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once per forward"):
        total.backward()


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 0.37), (torch.bfloat16, 1.0), (torch.float16, 2.0 ** 8)])
def test_trained_rows_of_a_frozen_head_get_the_gradient_of_those_rows_only(dtype, scale):
    """LoRA's trained token rows: the loss over the frozen weight with the rows in place, and a [k, hidden]
    gradient equal to those rows of the full weight gradient; no [vocab, hidden] product is ever formed."""
    hidden, head, targets, mask = make_inputs(dtype)
    indices = torch.tensor([5, 17, 299])
    targets[0, :3] = indices  # the trained rows are some targets
    rows = (0.3 * torch.randn(3, HIDDEN)).to(dtype).requires_grad_()
    patched = with_rows(head.detach(), (indices, rows.detach())).requires_grad_()
    expected = loss_and_grads(plain, hidden, patched, targets, mask, scale=scale)
    hidden.grad = None
    recorder = LargestTensors()
    with recorder:
        total, _ = masked_cross_entropy_from_hidden(hidden, head.detach(), targets, mask, chunk_rows=8,
                                                    trained_rows=(indices, rows))
        (total * scale).backward()
    assert rows.grad.shape == (3, HIDDEN) and rows.grad.dtype == dtype
    tolerance = {} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2 * expected[3].float().abs().max()}
    torch.testing.assert_close(total.detach(), expected[0], **({} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}))
    torch.testing.assert_close(hidden.grad.float(), expected[2].float(), **tolerance)
    torch.testing.assert_close(rows.grad.float(), expected[3][indices].float(), **tolerance)
    assert rows.grad[0].abs().sum() > 0
    products = [shape for name, shape in recorder.ops if "mm" in name]
    assert (VOCAB, HIDDEN) not in products and (3, HIDDEN) in products
    with pytest.raises(ValueError, match="trained_rows are the trained part of a frozen head_weight"):
        masked_cross_entropy_from_hidden(hidden, head, targets, mask, trained_rows=(indices, rows))


class LargestTensors(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns (forward, backward, autograd accumulation)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.ops: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
                self.ops.append((func.__name__, tuple(value.shape)))
        return out

    def largest(self) -> int:
        return max(torch.Size(shape).numel() for shape in self.shapes)


def test_no_tensor_of_trained_rows_by_vocab_is_ever_created():
    hidden, head, targets, mask = make_inputs(batch=4, length=64, trained=0.9)
    selected, chunk = int(mask.sum()), 32
    assert selected > 4 * chunk and HIDDEN < chunk
    recorder = LargestTensors()
    with recorder:
        total, _ = masked_cross_entropy_from_hidden(hidden, head, targets, mask, chunk_rows=chunk)
        total.backward()
    assert recorder.largest() <= chunk * VOCAB < selected * VOCAB
    assert max(shape[0] for shape in recorder.shapes if shape and shape[-1] == VOCAB) <= chunk
    # the recorder does see a full [selected, vocab] tensor when one is made: the plain computation
    hidden.grad = head.grad = None
    plain_recorder = LargestTensors()
    with plain_recorder:
        plain(hidden, head, targets, mask)[0].backward()
    assert plain_recorder.largest() >= selected * VOCAB


def test_evaluation_loss_and_accuracy_in_chunks():
    hidden, head, targets, mask = make_inputs()
    with torch.no_grad():
        logits = hidden @ head.t()
        targets = torch.where(torch.rand(targets.shape) < 0.5, logits.argmax(-1), targets)  # some right
        expected_sum, expected_count = masked_cross_entropy(logits, targets, mask)
        expected_correct = int(((logits.argmax(-1) == targets) & mask).sum())
    total, correct, count = masked_loss_and_correct(hidden, head, targets, mask, chunk_rows=7)
    assert count == int(expected_count) and 0 < correct == expected_correct < count
    assert total == pytest.approx(float(expected_sum), rel=1e-5)
    assert masked_loss_and_correct(hidden, head, targets, torch.zeros_like(mask)) == (0.0, 0, 0)


def test_shape_errors_name_the_shapes():
    hidden, head, targets, mask = make_inputs()
    with pytest.raises(ValueError, match="shape mismatch: hidden"):
        masked_cross_entropy_from_hidden(hidden, head, targets[:, :5], mask[:, :5])
    with pytest.raises(ValueError, match=r"head_weight has shape \(300, 23\)"):
        masked_cross_entropy_from_hidden(hidden, head[:, :23], targets, mask)
    with pytest.raises(ValueError, match="chunk_rows must be at least 1, got 0"):
        masked_cross_entropy_from_hidden(hidden, head, targets, mask, chunk_rows=0)
