"""Argument types the command-line tools share. argparse turns an ArgumentTypeError raised by a type into
its one usage error naming the flag and the value, before anything else runs."""
from __future__ import annotations

import argparse
from typing import Callable


def positive(kind: type = int) -> Callable[[str], int | float]:
    """An int or float above 0 (a count of GPUs, a length, a memory size): 0 or below would divide by zero
    or plan nothing."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n int' if kind is int else ' number'}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value

    return parse
