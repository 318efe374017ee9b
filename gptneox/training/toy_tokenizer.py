"""A small byte-level BPE tokenizer trained on the training conversations, for randomly initialised CPU
models (the `tiny` preset in tests and `make demo`), where the 50k-token GPT-NeoX vocabulary would make the
embedding and output head dwarf the rest of the model. Real runs use the model's own tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptneox.data.tokenizer import SPECIAL_TOKENS


def train_toy_tokenizer(conversations: Iterable[list[dict]], path: str | Path, vocab_size: int = 1024) -> Path:
    """Train on every message text and save `tokenizer.json` at `path` (a file path). Deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [message["text"] for conversation in conversations for message in conversation]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
