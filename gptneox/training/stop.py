"""Graceful stop on SIGTERM or Ctrl-C: the loop saves at the next step boundary, then exits cleanly."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from gptneox.training.distributed import all_reduce


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT that only raise a flag; a second signal is not special."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks together)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce(flag, op=dist.ReduceOp.MAX).item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
