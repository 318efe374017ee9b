"""Masked next-token cross-entropy, returned as (sum, count) so callers can average over any token set.

The training loss is the mean over all trained tokens of an optimizer step (all micro-batches and ranks),
so the per-micro-batch function must not divide: it returns the sum and the number of trained tokens.
The cross-entropy is computed in fp32 whatever the model dtype; an fp16 log-softmax over 50k classes
loses digits that the loss scale cannot give back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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

    In SFT most positions are prompts or padding; projecting only the trained ones skips most of the
    largest matmul and of the [tokens, vocab] activation.
    """
    return hidden[loss_mask.bool()] @ head_weight.t()


def masked_cross_entropy_from_hidden(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                                     loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as masked_cross_entropy(hidden @ head_weight.T, targets, loss_mask), computed on trained rows."""
    if hidden.shape[:-1] != targets.shape or targets.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    mask = loss_mask.bool()
    logits = trained_logits(hidden, head_weight, mask)
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum"), mask.sum()
