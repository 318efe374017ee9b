"""Masked next-token cross-entropy, returned as (sum, count) so callers can average over any token set.

The training loss is the mean over all trained tokens of an optimizer step (all micro-batches and ranks),
so the per-micro-batch function must not divide: it returns the sum and the number of trained tokens.
The cross-entropy is computed in fp32 whatever the model dtype; an fp16 log-softmax over 50k classes
loses digits that the loss scale cannot give back.

Training goes through `masked_cross_entropy_from_hidden`: it projects only the trained positions onto the
vocabulary, `chunk_rows` rows at a time, so a [trained tokens, vocab] logits tensor never exists (4 x 4096
tokens with a 50k vocabulary would be 3.3 GB in fp32, and its gradient as much again).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of hidden states projected at once: a [1024, 50k] fp32 chunk is 200 MB, and the matmuls are
# still large enough to run at full speed on CPUs and GPUs.
DEFAULT_CHUNK_ROWS = 1024


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies over positions where loss_mask is True, and how many there are.

    logits [..., vocab]; targets and loss_mask [...] (same leading shape).
    """
    if logits.shape[:-1] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    mask = loss_mask.bool()
    selected = logits[mask].float()
    total = F.cross_entropy(selected, targets[mask], reduction="sum")
    return total, mask.sum()


def trained_logits(hidden: torch.Tensor, head_weight: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Logits [n_trained, vocab] of the trained positions only, from final hidden states [..., hidden].

    For evaluation (accuracy needs the argmax); training uses the chunked loss below.
    """
    return hidden[loss_mask.bool()] @ head_weight.t()


def masked_cross_entropy_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                                     loss_mask: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same (sum, count) and gradients as masked_cross_entropy(hidden @ head_weight.T, targets, loss_mask).

    hidden [..., hidden_size]; head_weight [vocab, hidden_size]; targets and loss_mask [...]. Only the
    trained rows are projected, `chunk_rows` at a time; the largest temporary is [chunk_rows, vocab].
    """
    if hidden.shape[:-1] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_weight has shape {tuple(head_weight.shape)}, expected [vocab, {hidden.shape[-1]}]")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    mask = loss_mask.bool()
    total = ChunkedLinearCrossEntropy.apply(hidden[mask], head_weight, targets[mask], chunk_rows)
    return total, mask.sum()


def _chunks(rows: int, chunk_rows: int):
    return (slice(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows))


def _logits_gradient_(logits: torch.Tensor, logsumexp: torch.Tensor, targets: torch.Tensor,
                      scale: torch.Tensor | float) -> torch.Tensor:
    """d(sum of cross-entropies)/d(logits) = softmax - one_hot(targets), times scale, computed in place."""
    probabilities = logits.sub_(logsumexp[:, None]).exp_()
    probabilities[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return probabilities.mul_(scale)


def _accumulate(grad_hidden, grad_weight, rows, g, h, weight) -> None:
    """grad_hidden[rows] = g @ weight; grad_weight (fp32) += g.T @ h, without a [V, H] temporary in fp32."""
    if grad_hidden is not None:
        torch.mm(g, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        if g.dtype == grad_weight.dtype:
            grad_weight.addmm_(g.t(), h)
        else:
            grad_weight += g.t() @ h


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) over rows hidden [N, H], weight [V, H], in row chunks.

    The gradient of a chunk needs that chunk's softmax, so it is computed while the chunk's logits are at
    hand: in forward, and the backward only scales the stored gradients by the incoming scalar. This keeps
    one chunk of logits alive at a time and costs no recomputation (3 matmuls per chunk, as plain autograd).
    fp16 is the exception: its gradients must be multiplied by the loss scale before rounding to fp16 (the
    softmax of rare tokens would underflow otherwise), and the scale arrives only with the backward, so
    fp16 recomputes each chunk's logits in backward (4 matmuls per chunk).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        eager = hidden.dtype != torch.float16
        wants = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if eager and wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if eager and wants[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logsumexp = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        for rows in _chunks(len(targets), chunk_rows):
            h, t = hidden[rows], targets[rows]
            logits = (h @ weight.t()).float()
            logsumexp[rows] = torch.logsumexp(logits, dim=-1)
            total += (logsumexp[rows] - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is not None or grad_weight is not None:
                g = _logits_gradient_(logits, logsumexp[rows], t, 1.0).to(hidden.dtype)
                _accumulate(grad_hidden, grad_weight, rows, g, h, weight)
        ctx.chunk_rows = chunk_rows
        ctx.gradients = (grad_hidden, grad_weight) if eager else None
        ctx.save_for_backward(hidden, weight, targets, logsumexp)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, logsumexp = ctx.saved_tensors
        if ctx.gradients is None:
            grad_hidden, grad_weight = ChunkedLinearCrossEntropy._recompute(
                ctx, hidden, weight, targets, logsumexp, grad_total)
        else:
            grad_hidden, grad_weight = ctx.gradients
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_total.to(hidden.dtype)
            grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(weight.dtype)
        return grad_hidden, grad_weight, None, None

    @staticmethod
    def _recompute(ctx, hidden, weight, targets, logsumexp, grad_total):
        wants = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if wants[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        for rows in _chunks(len(targets), ctx.chunk_rows):
            h = hidden[rows]
            logits = (h @ weight.t()).float()
            g = _logits_gradient_(logits, logsumexp[rows], targets[rows], grad_total).to(hidden.dtype)
            _accumulate(grad_hidden, grad_weight, rows, g, h, weight)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)
