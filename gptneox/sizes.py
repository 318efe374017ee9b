"""Whole-number sizing shared by the model (vocabulary rows), the collator (row widths, packing) and the
trainer (vocabulary resize)."""
from __future__ import annotations


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value`."""
    return ceil_div(value, multiple) * multiple
