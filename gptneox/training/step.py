"""One optimizer step over a DeepSpeed engine, and what it reports.

The loss of a step is the mean over every trained token of the step, on all micro-batches and ranks, even
when micro-batches hold different numbers of trained tokens. DeepSpeed divides each micro-batch loss by
the accumulation steps (GAS) and averages gradients over ranks, so micro-batch i is given the loss
`sum_i * GAS * world / N`, where N is the step's trained-token count all-reduced up front: after
DeepSpeed's two divisions the gradient is exactly `d(sum over all tokens) / N`.

A stop requested during a step is honoured after the micro-batch in progress: the step is abandoned, not
finished. DeepSpeed changes the weights and the optimizer state only at the step's last micro-batch, so until
then they are those of the last finished step, whose checkpoint the loop then saves, and a resume replays the
abandoned step from its first micro-batch: the run goes on exactly as if never stopped. Finishing the step
instead would take the very time (a long accumulation) that the launcher's 30 s grace may not leave, and
saving half-accumulated gradients would need DeepSpeed to restore them mid-step, which it cannot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from gptneox.flops import batch_training_flops
from gptneox.training import loss as losses
from gptneox.training import noise
from gptneox.training.distributed import all_reduce, world_size


@dataclass
class StepResult:
    loss: float                # mean cross-entropy over the step's trained tokens (all ranks)
    trained_tokens: int        # all ranks
    tokens: int                # non-padding tokens, all ranks
    flops: float               # model FLOPs of the step's useful work, all ranks (gptneox.flops)
    skipped: bool              # fp16 overflow: no update, the schedule did not advance
    lr: float                  # the learning rate this update used
    grad_norm: float | None    # global gradient norm before clipping (None when DeepSpeed has none)
    loss_scale: float          # the fp16 loss scale after the step; 1.0 without fp16
    skipped_steps: int         # steps skipped for overflow since the start of training

    def non_finite(self, dtype: str) -> str | None:
        """What is not finite in this step ("loss nan, gradient norm inf"), or None. Under fp16 a step that
        DeepSpeed's dynamic loss scaling skipped is not a failure (the loop counts those in a row); in other
        dtypes there is no loss scale to lower, and DeepSpeed's skip of a non-finite fp32 step is one too."""
        if dtype == "fp16" and self.skipped:
            return None
        figures = {"loss": self.loss, "gradient norm": self.grad_norm}
        bad = [f"{name} {value}" for name, value in figures.items() if value is not None and not math.isfinite(value)]
        if self.grad_norm is not None and self.grad_norm < 0:  # DeepSpeed's stand-in for a NaN or inf norm
            bad.append("gradient norm not finite")
        if self.skipped and not bad:
            bad = ["gradient norm not finite (DeepSpeed skipped the update)"]
        return ", ".join(bad) or None


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def zero_loss(hidden: torch.Tensor, head_weight: torch.Tensor, trained_rows=None) -> torch.Tensor:
    """A zero that depends on every parameter, for a micro-batch without samples (an LMHead `head`).
    Summed in fp32: an fp16 sum of a whole embedding passes 65504, and inf * 0 is NaN."""
    zero = hidden.float().sum() * 0.0 + head_weight.float().sum() * 0.0
    return zero if trained_rows is None else zero + trained_rows[1].float().sum() * 0.0


def train_step(engine: Any, micro_batches: list[dict],
               stopped: Callable[[], bool] = lambda: False) -> StepResult | None:
    """Forward, backward and `engine.step()` for each of this rank's micro-batches of one optimizer step;
    None when `stopped` (asked between two micro-batches, a collective like StopRequest.agreed) says to
    abandon the step."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"{len(micro_batches)} micro-batches for gradient_accumulation_steps="
                         f"{engine.gradient_accumulation_steps()}")
    world = world_size()
    device = engine.device
    lr = engine.get_lr()[0]  # the rate this update uses; the scheduler steps inside engine.step()
    # Counts and FLOPs before the move to the device: read back from a GPU, each would be a sync
    local = [float(sum(b["loss_mask"].sum() for b in micro_batches)),
             float(sum(b["attention_mask"].sum() for b in micro_batches)),
             sum(batch_training_flops(engine.module.config, b) for b in micro_batches if b["input_ids"].numel())]
    micro_batches = [{k: v.to(device) for k, v in b.items()} for b in micro_batches]
    trained, tokens, flops = all_reduce_sum(local, device)
    scale = len(micro_batches) * world / max(trained, 1.0)
    skipped_before = engine.skipped_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for index, batch in enumerate(micro_batches):
        if index and stopped():
            return None
        if batch["input_ids"].numel() == 0:
            # Every sample of this micro-batch was dropped by the collator: a zero loss over a one-token
            # forward, so every parameter gets a (zero) gradient and ZeRO-2 reduces the same gradients as
            # on the other ranks (a backward reaching only some parameters hangs or aborts the collectives).
            # Under ZeRO-3 the same forward also makes this rank join every module's weight gathers.
            total = engine(torch.zeros((1, 1), dtype=torch.long, device=device), head=zero_loss)
        else:
            total, _ = losses.batch_loss(engine, batch)
        engine.backward(total * scale)
        with noise.optimizer_step():
            engine.step()
        loss_sum += total.detach().double()
    (global_loss_sum,) = all_reduce_sum([loss_sum.item()], device)
    grad_norm = engine.get_global_grad_norm()
    return StepResult(loss=global_loss_sum / max(trained, 1.0), trained_tokens=int(trained), tokens=int(tokens),
                      flops=flops, skipped=engine.skipped_steps > skipped_before, lr=lr,
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      loss_scale=float(engine.optimizer.cur_scale) if engine.fp16_enabled() else 1.0,
                      skipped_steps=engine.skipped_steps)
