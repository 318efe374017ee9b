"""The warnings DeepSpeed and torch print on every normal run that say nothing about the run, and filters that
drop exactly those messages around the one call that prints each. Everything else they say still shows
(a schedule shorter than its warm-up, say)."""
from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging's logger
# WarmupLR.__init__ calls its own get_lr() before step 0 to set the first rate, which warns every time.
SCHEDULER_NOT_STARTED = "Attempting to get learning rate from scheduler before it has started"
# DeepSpeed picks its accelerator on import and warns when it falls back to the CPU.
NO_ACCELERATOR_FOUND = ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                        "detect it.")
# torch 2.13 deprecates the collective that DeepSpeed 0.19's ZeRO optimizer step gathers partitions with.
ALL_GATHER_DEPRECATED = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                         "`torch.distributed.all_gather_single` instead.")


class _DropMessages(logging.Filter):
    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = set(messages)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


@contextmanager
def deepspeed_log_dropped(*messages: str) -> Iterator[None]:
    """DeepSpeed's log records whose text is exactly one of `messages` are dropped inside the block."""
    logger, dropped = logging.getLogger(DEEPSPEED_LOGGER), _DropMessages(messages)
    logger.addFilter(dropped)  # the logger is a singleton: one made before DeepSpeed's import is DeepSpeed's
    try:
        yield
    finally:
        logger.removeFilter(dropped)


def deepspeed_import():
    """Around the first `import deepspeed`. Its CPU fallback warning is dropped only where torch sees no CUDA
    device at all (a CPU machine: the run's lines say "CPU accelerator"); a GPU that fails to initialise
    still gets DeepSpeed's warning."""
    return deepspeed_log_dropped(*() if torch.cuda.device_count() else (NO_ACCELERATOR_FOUND,))


@contextmanager
def optimizer_step() -> Iterator[None]:
    """Around `engine.step()`: torch's deprecation of the collective inside DeepSpeed's ZeRO step is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(ALL_GATHER_DEPRECATED) + r"\Z", category=FutureWarning)
        yield
