"""Masked next-token cross-entropy, returned as (sum, count) so callers can average over any token set.

The training loss is the mean over all trained tokens of an optimizer step (all micro-batches and ranks),
so the per-micro-batch function must not divide: it returns the sum and the number of trained tokens.
The cross-entropy is computed in fp32 whatever the model dtype; an fp16 log-softmax over 50k classes
loses digits that the loss scale cannot give back.

Training goes through `masked_cross_entropy_from_hidden`: it projects only the trained positions onto the
vocabulary, `chunk_rows` rows at a time, so a [trained tokens, vocab] logits tensor never exists (4 x 4096
tokens with a 50k vocabulary would be 3.3 GB in fp32, and its gradient as much again). Under LoRA the head
weight is frozen but some of its rows are trained (the chat tokens'): those come as `trained_rows`, and the
loss computes the gradient of those rows only, never a [vocab, hidden] weight gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (row indices [k], their trained values [k, hidden]): rows of a frozen head weight that are trained.
TrainedRows = tuple[torch.Tensor, torch.Tensor]

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
    def head(hidden, weight, trained_rows=None):
        return masked_cross_entropy_from_hidden(hidden, weight, batch["targets"], batch["loss_mask"], chunk_rows,
                                                trained_rows)

    return model(batch["input_ids"], head=head, **model_inputs(batch))


def with_rows(weight: torch.Tensor, trained_rows: TrainedRows | None) -> torch.Tensor:
    """`weight` with the trained rows put in place (a copy), or `weight` itself without any."""
    if trained_rows is None:
        return weight
    indices, rows = trained_rows
    return weight.index_copy(0, indices, rows.to(weight.dtype))


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
                            loss_mask: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                            trained_rows: TrainedRows | None = None) -> tuple[float, int, int]:
    """Evaluation: (cross-entropy sum, correct argmax predictions, count) over the trained positions.

    Chunked like the training loss, so an evaluation batch never holds [trained tokens, vocab] logits;
    the sums stay on the device until the end, so a GPU syncs once per batch, not twice per chunk.
    """
    _check_shapes("hidden", hidden, targets, loss_mask)
    head_weight = with_rows(head_weight, trained_rows)
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
                                     loss_mask: torch.Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                                     trained_rows: TrainedRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same (sum, count) and gradients as masked_cross_entropy(hidden @ W.T, targets, loss_mask), where W
    is head_weight with `trained_rows` put in place (with_rows).

    hidden [..., hidden_size]; head_weight [vocab, hidden_size]; targets and loss_mask [...]. Only the
    trained positions are projected, `chunk_rows` at a time: besides the weight gradient ([vocab,
    hidden_size], or [k, hidden_size] for k trained rows of a frozen weight), no temporary is larger than
    [chunk_rows, vocab].
    """
    _check_shapes("hidden", hidden, targets, loss_mask)
    if head_weight.dim() != 2 or head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"head_weight has shape {tuple(head_weight.shape)}, expected [vocab, {hidden.shape[-1]}]")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    indices, rows = (None, None) if trained_rows is None else trained_rows
    if rows is not None and head_weight.requires_grad:
        raise ValueError("trained_rows are the trained part of a frozen head_weight, but head_weight requires grad")
    mask = loss_mask.bool()
    if not torch.is_grad_enabled():  # a Function's needs_input_grad ignores no_grad: skip the gradient work
        hidden, head_weight = hidden.detach(), head_weight.detach()
        rows = None if rows is None else rows.detach()
    total = ChunkedLinearCrossEntropy.apply(hidden[mask], head_weight, targets[mask], chunk_rows, indices, rows)
    return total, mask.sum()


def _chunked_pass(hidden, weight, targets, chunk_rows: int, grad_scale, want_hidden: bool, want_weight: bool,
                  weight_rows: torch.Tensor | None = None):
    """(loss sum, d/d hidden, d/d weight) with gradients times grad_scale, one [chunk_rows, V] logits at a time;
    with `weight_rows`, d/d weight is that of those rows only ([k, H]).

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
            g_weight = g if weight_rows is None else g[:, weight_rows]
            if grad_weight is None:
                grad_weight = (g_weight.t() @ h).float()
            elif g.dtype == grad_weight.dtype:
                grad_weight.addmm_(g_weight.t(), h)
            else:
                grad_weight += g_weight.t() @ h
    if want_weight and grad_weight is None:  # no trained row: a zero gradient, not a missing one
        shape = weight.shape if weight_rows is None else (len(weight_rows), weight.shape[1])
        grad_weight = torch.zeros(shape, dtype=torch.float32, device=weight.device)
    return total, grad_hidden, grad_weight


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ W.T, targets[i]) over rows hidden [N, H], in row chunks, where W [V, H] is
    `weight`, or, with `rows`, the frozen `weight` with rows [k, H] put in place at `indices` [k] (then
    only `rows` gets a gradient).

    The gradient of a chunk needs that chunk's softmax, so it is computed while the chunk's logits are at
    hand: in forward, and the backward only scales the stored gradients by the incoming scalar. This keeps
    one chunk of logits alive at a time and costs no recomputation (3 matmuls per chunk, as plain autograd).
    fp16 is the exception: its gradients must be multiplied by the loss scale before rounding to fp16 (the
    softmax of rare tokens would underflow otherwise), and the scale arrives only with the backward, so
    fp16 recomputes each chunk's logits in backward (4 matmuls per chunk).
    The stored gradients are scaled in place and released, so a second backward through it is an error.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, indices=None, rows=None):
        ctx.recompute = hidden.dtype == torch.float16
        want_hidden = ctx.needs_input_grad[0]
        want_weight = ctx.needs_input_grad[1] or (rows is not None and ctx.needs_input_grad[5])
        ctx.grad_dtype = weight.dtype if rows is None else rows.dtype
        if rows is not None:
            weight = with_rows(weight, (indices, rows))
        if ctx.recompute:
            total, _, _ = _chunked_pass(hidden, weight, targets, chunk_rows, 1.0, False, False)
            ctx.chunk_rows = chunk_rows
            ctx.save_for_backward(hidden, weight, targets, indices)
        else:
            total, grad_hidden, grad_weight = _chunked_pass(hidden, weight, targets, chunk_rows, 1.0,
                                                            want_hidden, want_weight, indices)
            ctx.gradients = [grad_hidden, grad_weight]
        return total

    @staticmethod
    def backward(ctx, grad_total):
        want_hidden = ctx.needs_input_grad[0]
        want_weight = ctx.needs_input_grad[1] or ctx.needs_input_grad[5]
        if ctx.recompute:
            hidden, weight, targets, indices = ctx.saved_tensors
            _, grad_hidden, grad_weight = _chunked_pass(hidden, weight, targets, ctx.chunk_rows, grad_total,
                                                        want_hidden, want_weight, indices)
        else:
            if ctx.gradients is None:
                raise RuntimeError("backward through the chunked cross-entropy can run only once per forward")
            grad_hidden, grad_weight = ctx.gradients
            ctx.gradients = None
            if grad_hidden is not None:
                grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
            if grad_weight is not None:
                grad_weight = grad_weight.mul_(grad_total)
        grad_weight = None if grad_weight is None else grad_weight.to(ctx.grad_dtype)
        if ctx.needs_input_grad[5]:  # the gradient belongs to the trained rows, not to the frozen weight
            return grad_hidden, None, None, None, None, grad_weight
        return grad_hidden, grad_weight, None, None, None, None
