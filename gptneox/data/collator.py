"""Turn a list of conversations into a training batch whose loss covers only the assistant replies.

The masking rule: ``targets[t] = input_ids[t + 1]`` and ``loss_mask[t]`` is True exactly when
``targets[t]`` is a token of an assistant reply (its text or its closing ``<|endoftext|>``). Role
tokens, prompter text, system text and padding are never trained.

Differences from the reference collator, on purpose: the reference also trained the ``<|prompter|>``
that follows a non-final reply, and every token before the first role token (its role counter starts
at -1 and ``-1 % 2 == 1``), which includes a leading system message. We train neither.

Randomness (random truncation windows) comes from numpy Generators. By default one is seeded with
``seed`` and advances with each call, so a run is reproducible given the call order. The training loop
passes each conversation's index in the training set (``sample_ids``) and calls ``set_epoch(epoch)``:
a conversation's window then depends only on ``(seed, epoch, sample id)``, not on which batch, rank or
process collates it, so resume and any world size or micro-batch size reproduce the same windows.

A sample with no trained target left after truncation is dropped and counted in ``dropped``. If every
sample of a call is dropped, the call returns an empty but valid batch: every tensor has shape
``[0, 0]``; a caller can test ``batch["input_ids"].numel() == 0`` and it adds no trained tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from gptneox.data.formatting import ConversationError, ConversationTokenizer, normalize_conversation
from gptneox.data.tokenizer import PAD_TOKEN
from gptneox.sizes import round_up


@dataclass
class _Sample:
    """One conversation after truncation: ids, and per position whether its target is trained."""

    ids: list[int]
    loss_mask: list[bool]


class DialogueCollator:
    """Callable that builds ``input_ids, targets, loss_mask, attention_mask, position_ids`` [B, T].

    pack=False: one conversation per row, right padding to the longest row rounded up to
    ``pad_to_multiple_of``. pack=True: every conversation of the call end to end in a single row [1, T]
    (padding-free: only the rounding up to ``pad_to_multiple_of``); ``segment_ids`` numbers them,
    ``position_ids`` restart at 0 for each, and trailing padding is one more segment with ``loss_mask``
    False. The target of a sample's last token is the pad id and is never trained, so no target crosses
    into the next sample. ``max_length`` bounds each conversation, not the row: attention runs per
    segment, so the long row costs what its conversations cost. (Rows of at most ``max_length``, the
    first design, left 10-23% padding at real chat lengths: docs/benchmarks.md.)
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int = 512,
        random_offset_probability: float = 0.8,
        pad_to_multiple_of: int | None = 16,
        pack: bool = False,
        seed: int = 0,
    ):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a token and its target), got {max_length}")
        if not 0.0 <= random_offset_probability <= 1.0:
            raise ValueError(f"random_offset_probability must be in [0, 1], got {random_offset_probability}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of}")
        self.encode = ConversationTokenizer(tokenizer)
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if self.pad_id is None:
            raise ValueError(f"tokenizer has no {PAD_TOKEN}; load it with gptneox.data.load_tokenizer")
        self.max_length = max_length
        self.random_offset_probability = random_offset_probability
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pack = pack
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.epoch = 0
        self.dropped = 0

    def set_epoch(self, epoch: int) -> None:
        """Windows of conversations passed with sample_ids are keyed by (seed, epoch, sample id)."""
        self.epoch = epoch

    def __call__(self, conversations: Sequence[Any], sample_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        if sample_ids is not None and len(sample_ids) != len(conversations):
            raise ValueError(f"{len(sample_ids)} sample_ids for {len(conversations)} conversations")
        samples = []
        for index, sample in enumerate(conversations):
            try:
                conversation = normalize_conversation(sample)
            except ConversationError as error:
                raise ConversationError(f"sample {index} of the batch: {error}") from None
            rng = self.rng if sample_ids is None else np.random.default_rng([self.seed, self.epoch, sample_ids[index]])
            truncated = self._truncate(conversation, rng)
            if any(truncated.loss_mask):
                samples.append(truncated)
            else:
                self.dropped += 1
        if not samples:
            return self._empty_batch()
        rows = [samples] if self.pack else [[sample] for sample in samples]
        return self._to_tensors(rows)

    def _truncate(self, conversation: list[dict[str, str]], rng: np.random.Generator) -> _Sample:
        tokens = self.encode(conversation)
        # loss_mask[t] says whether target t (= token t + 1) is trained; the last token has no target.
        loss_mask = tokens.in_reply[1:] + [False]
        length = len(tokens.ids)
        start = 0
        if length > self.max_length and rng.random() < self.random_offset_probability:
            start = int(rng.integers(0, length - self.max_length + 1))
        end = min(length, start + self.max_length)
        window_mask = loss_mask[start:end]
        window_mask[-1] = False  # its target lies outside the window
        return _Sample(tokens.ids[start:end], window_mask)

    def _to_tensors(self, rows: list[list[_Sample]]) -> dict[str, torch.Tensor]:
        width = round_up(max(sum(len(s.ids) for s in row) for row in rows), self.pad_to_multiple_of or 1)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        targets = torch.full(shape, self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(shape, dtype=torch.bool)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        position_ids = torch.arange(width).repeat(len(rows), 1)
        segment_ids = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(rows):
            cursor = 0
            for segment, sample in enumerate(row):
                n = len(sample.ids)
                span = slice(cursor, cursor + n)
                ids = torch.tensor(sample.ids, dtype=torch.long)
                input_ids[r, span] = ids
                targets[r, cursor : cursor + n - 1] = ids[1:]
                loss_mask[r, span] = torch.tensor(sample.loss_mask, dtype=torch.bool)
                attention_mask[r, span] = 1
                position_ids[r, span] = torch.arange(n)
                segment_ids[r, span] = segment
                cursor += n
            if self.pack and cursor < width:  # trailing padding: a segment of its own, positions from 0
                position_ids[r, cursor:] = torch.arange(width - cursor)
                segment_ids[r, cursor:] = len(row)
        batch = {
            "input_ids": input_ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        if self.pack:
            batch["segment_ids"] = segment_ids
        return batch

    def _empty_batch(self) -> dict[str, torch.Tensor]:
        keys = ["input_ids", "targets", "attention_mask", "position_ids"] + (["segment_ids"] if self.pack else [])
        batch = {key: torch.zeros((0, 0), dtype=torch.long) for key in keys}
        batch["loss_mask"] = torch.zeros((0, 0), dtype=torch.bool)
        return batch
