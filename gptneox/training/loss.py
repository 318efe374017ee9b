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
# The collated batch keys a model forward takes besides input_ids (segment_ids only in packed batches).
MODEL_INPUTS = ("position_ids", "attention_mask", "segment_ids")


def model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def batch_loss(model, batch: dict, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss (sum, count) of a collated batch. `model` is a GPTNeoX or a DeepSpeed engine
    wrapping one; the loss is computed inside the LM head's forward (gptneox.model.LMHead), where ZeRO-3
    has gathered the head weight."""
    def head(hidden, weight):
        return masked_cross_entropy_from_hidden(hidden, weight, batch["targets"], batch["loss_mask"], chunk_rows)

    return model(batch["input_ids"], head=head, **model_inputs(batch))


def _check_shapes(first_name: str, first: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> None:
    """first [..., features] (logits or hidden states); targets and loss_mask [...]."""
    if first.shape[:-1] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: {first_name} {tuple(first.shape)}, targets {tuple(targets.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cross-entropies over positions where loss_mask is True, and how many there are.

    logits [..., vocab]; targets and loss_mask [...] (same leading shape).
    """
    _check_shapes("logits", logits, targets, loss_mask)
    mask = loss_mask.bool()
    selected = logits[mask].float()
    total = F.cross_entropy(selected, targets[mask], reduction="sum")
    return total, mask.sum()


@torch.no_grad()
def masked_loss_and_correct(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                            loss_mask: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
                            ) -> tuple[float, int, int]:
    """Evaluation: (cross-entropy sum, correct argmax predictions, count) over the trained positions.

    Chunked like the training loss, so an evaluation batch never holds [trained tokens, vocab] logits;
    the sums stay on the device until the end, so a GPU syncs once per batch, not twice per chunk.
    """
    _check_shapes("hidden", hidden, targets, loss_mask)
    mask = loss_mask.bool()
    rows, wanted = hidden[mask], targets[mask]
    sums = torch.zeros(2, dtype=torch.float64, device=hidden.device)  # cross-entropy, correct predictions
    for start in range(0, len(wanted), chunk_rows):
        logits = (rows[start:start + chunk_rows] @ head_weight.t()).float()
        chunk_targets = wanted[start:start + chunk_rows]
        sums[0] += F.cross_entropy(logits, chunk_targets, reduction="sum")
        sums[1] += (logits.argmax(-1) == chunk_targets).sum()
    total, correct = sums.tolist()
    return total, int(correct), len(wanted)


def masked_cross_entropy_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                                     loss_mask: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same (sum, count) and gradients as masked_cross_entropy(hidden @ head_weight.T, targets, loss_mask).

    hidden [..., hidden_size]; head_weight [vocab, hidden_size]; targets and loss_mask [...]. Only the
    trained rows are projected, `chunk_rows` at a time: besides the [vocab, hidden_size] weight gradient,
    no temporary is larger than [chunk_rows, vocab].
    """
    _check_shapes("hidden", hidden, targets, loss_mask)
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_weight has shape {tuple(head_weight.shape)}, expected [vocab, {hidden.shape[-1]}]")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    mask = loss_mask.bool()
    if not torch.is_grad_enabled():  # a Function's needs_input_grad ignores no_grad: skip the gradient work
        hidden, head_weight = hidden.detach(), head_weight.detach()
    total = ChunkedLinearCrossEntropy.apply(hidden[mask], head_weight, targets[mask], chunk_rows)
    return total, mask.sum()


def _chunked_pass(hidden, weight, targets, chunk_rows: int, grad_scale, want_hidden: bool, want_weight: bool):
    """(loss sum, d/d hidden, d/d weight) with gradients times grad_scale, one [chunk_rows, V] logits at a time.

    A chunk's gradient w.r.t. its logits is softmax - one_hot(targets), formed in place in the fp32 logits.
    The weight gradient accumulates in fp32 (a bf16 sum over thousands of rows would lose digits); the
    first chunk's product becomes the accumulator, so fp32 makes no [V, H] temporary.
    """
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = None
    for start in range(0, len(targets), chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t = hidden[rows], targets[rows]
        logits = (h @ weight.t()).float()
        logsumexp = torch.logsumexp(logits, dim=-1)
        total += (logsumexp - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if not (want_hidden or want_weight):
            continue
        g = logits.sub_(logsumexp[:, None]).exp_()
        g[torch.arange(len(t), device=t.device), t] -= 1.0
        g = g.mul_(grad_scale).to(hidden.dtype)
        if want_hidden:
            torch.mm(g, weight, out=grad_hidden[rows])
        if want_weight:
            if grad_weight is None:
                grad_weight = (g.t() @ h).float()
            elif g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g.t(), h)
            else:
                grad_weight += g.t() @ h
    if want_weight and grad_weight is None:  # no trained row: a zero gradient, not a missing one
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    return total, grad_hidden, grad_weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) over rows hidden [N, H], weight [V, H], in row chunks.

    The gradient of a chunk needs that chunk's softmax, so it is computed while the chunk's logits are at
    hand: in forward, and the backward only scales the stored gradients by the incoming scalar. This keeps
    one chunk of logits alive at a time and costs no recomputation (3 matmuls per chunk, as plain autograd).
    fp16 is the exception: its gradients must be multiplied by the loss scale before rounding to fp16 (the
    softmax of rare tokens would underflow otherwise), and the scale arrives only with the backward, so
    fp16 recomputes each chunk's logits in backward (4 matmuls per chunk).
    The stored gradients are scaled in place and released, so a second backward through it is an error.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        ctx.recompute = hidden.dtype == torch.float16
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if ctx.recompute:
            total, _, _ = _chunked_pass(hidden, weight, targets, chunk_rows, 1.0, False, False)
            ctx.chunk_rows = chunk_rows
            ctx.save_for_backward(hidden, weight, targets)
        else:
            total, grad_hidden, grad_weight = _chunked_pass(hidden, weight, targets, chunk_rows, 1.0,
                                                            want_hidden, want_weight)
            ctx.gradients, ctx.weight_dtype = [grad_hidden, grad_weight], weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if ctx.recompute:
            hidden, weight, targets = ctx.saved_tensors
            _, grad_hidden, grad_weight = _chunked_pass(hidden, weight, targets, ctx.chunk_rows, grad_total,
                                                        want_hidden, want_weight)
            return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None
        if ctx.gradients is None:
            raise RuntimeError("backward through the chunked cross-entropy can run only once per forward")
        grad_hidden, grad_weight = ctx.gradients
        ctx.gradients = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None
