"""Evaluation during training: the evaluation sets, their collator, each rank's share, and when to run.

Evaluation batches are collated deterministically (no random windows, no rounding of the row width), so
every evaluation of a run sees the same tokens; they are packed when training packs (the same sums,
without the padding's compute). Each rank takes every world-th batch; the sums are all-reduced, so the
figures do not depend on the number of ranks.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from tokenizers import Tokenizer

from gptneox.data import DialogueCollator
from gptneox.training import loss as losses
from gptneox.training.distributed import all_reduce
from gptneox.training.metrics import eval_key
from gptneox.training.stop import StopRequest

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(engine: Any, batches: Iterable[dict | None],
             stopped: Callable[[], bool] | None = None) -> tuple[float, float, int] | None:
    """(masked loss, token accuracy, trained tokens) over this rank's `batches`, summed over all ranks; None when no rank's
    batches held a trained token (every rank agrees, the count is summed first). EvaluationStopped when
    `stopped` (a collective asked before each batch) turned true: every rank passes as many batches (None
    for a round in which it has none), so that they ask the same number of times. Collective."""
    was_training = engine.module.training
    engine.eval()
    loss_sum = correct = count = 0.0
    for batch in batches:
        if stopped is not None and stopped():
            engine.train(was_training)
            raise EvaluationStopped
        if batch is None or batch["input_ids"].numel() == 0:
            # a one-token forward all the same: under ZeRO-3 every rank must join each module's weight gathers
            engine(torch.zeros((1, 1), dtype=torch.long, device=engine.device), head=lambda hidden, weight, trained_rows=None: None)
            continue
        batch = {k: v.to(engine.device) for k, v in batch.items()}

        def head(hidden, weight, trained_rows=None):
            return losses.masked_loss_and_correct(hidden, weight, batch["targets"], batch["loss_mask"],
                                                  trained_rows=trained_rows)

        total, right, n = engine(batch["input_ids"], head=head, **losses.model_inputs(batch))
        loss_sum += total
        count += n
        correct += right
    engine.train(was_training)
    sums = all_reduce(torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=engine.device))
    loss_sum, correct, count = sums.tolist()
    if count == 0:
        return None
    return loss_sum / count, correct / count, int(count)


class EvaluationStopped(Exception):
    """A stop was requested during an evaluation; it ends without results."""


class Evaluator:
    """Runs as `strategy` says (the Trainer's eval_strategy): every `every` optimizer steps ("steps"), at each
    epoch end ("epoch"), and then once more at the end unless the last step just did; or never ("no")."""

    def __init__(self, eval_sets: dict[str, list], tokenizer: Tokenizer, *, max_length: int, batch_size: int,
                 every: int, rank: int, world: int, size: int | None = None, pack: bool = False,
                 strategy: str = "steps"):
        """`size` keeps only the first samples of every set (None: all); `pack` lays each batch in one row."""
        self.eval_sets = {name: samples[:size] if size else samples for name, samples in eval_sets.items()}
        self.collate = DialogueCollator(tokenizer, max_length=max_length, random_offset_probability=0.0,
                                        pad_to_multiple_of=None, pack=pack)
        self.batch_size, self.every, self.rank, self.world = batch_size, every, rank, world
        self.strategy = strategy
        self.without_trained_tokens: set[str] = set()  # sets already reported as such

    def due(self, step: int, epoch_done: bool) -> bool:
        """Whether the step just taken evaluates (`epoch_done`: it ended an epoch)."""
        return (self.strategy == "steps" and step % self.every == 0) or (self.strategy == "epoch" and epoch_done)

    def due_at_end(self, step: int, epoch_done: bool) -> bool:
        """Whether the run evaluates once more after its last step (which did not already)."""
        return self.strategy != "no" and not self.due(step, epoch_done)

    def my_batches(self, samples: list) -> list[list | None]:
        """This rank's batches of one set: batch i goes to rank i mod world; None where the last round has
        none for this rank, so that every rank has as many."""
        size, stride = self.batch_size, self.world * self.batch_size
        rounds = -(-len(samples) // stride)
        return [samples[i:i + size] if i < len(samples) else None
                for i in range(self.rank * size, rounds * stride, stride)]

    def run(self, engine: Any, stop: StopRequest) -> dict[str, float]:
        """{eval_NAME_loss, eval_NAME_accuracy} of every set, and eval_loss, eval_accuracy over all their
        trained tokens together (the Trainer's overall figures); nothing once a stop is requested: the launcher
        kills the job soon after its SIGTERM (DeepSpeed's after about 30 s), and the checkpoint comes first;
        a stop during the evaluation ends it at the next batch, without results. Collective, like stop.agreed."""
        if stop.agreed(engine.device):
            return {}
        results, loss_sum, correct, count = {}, 0.0, 0.0, 0
        for name, samples in self.eval_sets.items():
            batches = (None if batch is None else self.collate(batch) for batch in self.my_batches(samples))
            try:
                result = evaluate(engine, batches, stopped=lambda: stop.agreed(engine.device))
            except EvaluationStopped:
                return {}
            if result is None:  # a loss of 0.0 would read as a perfect model
                if self.rank == 0 and name not in self.without_trained_tokens:
                    log.warning("eval set %s: its %d conversations hold no trained (assistant) token within "
                                "max_length %d; it has no loss or accuracy", name, len(samples),
                                self.collate.max_length)
                self.without_trained_tokens.add(name)
                continue
            loss, accuracy, tokens = result
            results.update({eval_key(name, "loss"): loss, eval_key(name, "accuracy"): accuracy})
            loss_sum, correct, count = loss_sum + loss * tokens, correct + accuracy * tokens, count + tokens
        if count:
            results.update({eval_key(None, "loss"): loss_sum / count, eval_key(None, "accuracy"): correct / count})
        return results
