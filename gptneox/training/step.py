"""One optimizer step and one evaluation pass over a DeepSpeed engine.

The loss of a step is the mean over every trained token of the step, on all micro-batches and ranks, even
when micro-batches hold different numbers of trained tokens. DeepSpeed divides each micro-batch loss by
the accumulation steps (GAS) and averages gradients over ranks, so micro-batch i is given the loss
`sum_i * GAS * world / N`, where N is the step's trained-token count all-reduced up front: after
DeepSpeed's two divisions the gradient is exactly `d(sum over all tokens) / N`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gptneox.flops import batch_training_flops
from gptneox.training import loss as losses

@dataclass
class StepResult:
    loss: float                # mean cross-entropy over the step's trained tokens (all ranks)
    trained_tokens: int        # all ranks
    tokens: int                # non-padding tokens, all ranks
    flops: float               # model FLOPs of the step's useful work, all ranks (gptneox.flops)
    skipped: bool              # fp16 overflow: no update, the schedule did not advance


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def train_step(engine: Any, micro_batches: list[dict]) -> StepResult:
    """Forward, backward and `engine.step()` for each of this rank's micro-batches of one optimizer step."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = engine.device
    # FLOPs before the move to the device: packed rows count each segment with .tolist(), a sync on a GPU
    flops = sum(batch_training_flops(engine.module.config, b) for b in micro_batches if b["input_ids"].numel())
    micro_batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches]
    local = [float(sum(b["loss_mask"].sum() for b in micro_batches)),
             float(sum(b["attention_mask"].sum() for b in micro_batches)), flops]
    trained, tokens, flops = all_reduce_sum(local, device)
    scale = len(micro_batches) * world / max(trained, 1.0)
    skipped_before = engine.skipped_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in micro_batches:
        if batch["input_ids"].numel() == 0:
            # Every sample of this micro-batch was dropped by the collator: a zero loss over a one-token
            # forward, so every parameter gets a (zero) gradient and ZeRO-2 reduces the same gradients as
            # on the other ranks (a backward reaching only some parameters hangs or aborts the collectives).
            hidden = engine(torch.zeros((1, 1), dtype=torch.long, device=device), return_hidden=True)
            # summed in fp32: an fp16 sum of a whole embedding passes 65504, and inf * 0 is NaN
            total = hidden.float().sum() * 0.0 + engine.module.output_embedding.float().sum() * 0.0
        else:
            total, _ = losses.batch_loss(engine, batch)
        engine.backward(total * scale)
        engine.step()
        loss_sum += total.detach().double()
    (global_loss_sum,) = all_reduce_sum([loss_sum.item()], device)
    return StepResult(loss=global_loss_sum / max(trained, 1.0), trained_tokens=int(trained), tokens=int(tokens),
                      flops=flops, skipped=engine.skipped_steps > skipped_before)


@torch.no_grad()
def evaluate(engine: Any, batches: list[dict]) -> tuple[float, float]:
    """(masked loss, token accuracy) over this rank's `batches`, summed over all ranks. Collective."""
    was_training = engine.module.training
    engine.eval()
    loss_sum = correct = count = 0.0
    for batch in batches:
        if batch["input_ids"].numel() == 0:
            continue
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        hidden = engine(batch["input_ids"], return_hidden=True, **losses.model_inputs(batch))
        total, right, n = losses.masked_loss_and_correct(hidden, engine.module.output_embedding, batch["targets"],
                                                         batch["loss_mask"])
        loss_sum += total
        count += n
        correct += right
    engine.train(was_training)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], engine.device)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)
