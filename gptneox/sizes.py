"""Whole-number sizing shared by the model (vocabulary rows), the collator (row widths, packing) and the
trainer (vocabulary resize)."""
from __future__ import annotations

# A grown vocabulary (the tokenizer's chat tokens) is rounded up to this many rows: training, and chat
# over a base model with an adapter, grow it alike.
VOCAB_MULTIPLE = 16


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value`."""
    return ceil_div(value, multiple) * multiple
