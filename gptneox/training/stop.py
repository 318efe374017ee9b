"""Graceful stop: on SIGTERM, Ctrl-C, or the death of the launcher, every rank saves at the next step
boundary and exits with STOPPED_EXIT.

Whatever is signalled, the ranks agree on the stop through a collective, so one signalled rank stops them all.
DeepSpeed's per-node launcher forwards SIGTERM and SIGINT to the ranks, then kills them 30 s later; the
single-node `deepspeed` command above it forwards nothing and just dies. So each rank also watches its
launcher processes (the per-node launcher, and the `deepspeed` command above it) and stops as if signalled
when one of them is gone: otherwise killing the command would leave the ranks training with nobody waiting.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from gptneox.training.distributed import all_reduce

# EX_TEMPFAIL of sysexits.h ("temporary failure, the user is invited to retry"): stopped early on request,
# with a checkpoint of the last finished step; rerun the command with --resume to continue.
STOPPED_EXIT = 75
WATCH_INTERVAL_S = 1.0
_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch", "torchrun")


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT that only raise a flag (a second signal is not special),
    and starts the launcher watch."""

    def __init__(self, watch: bool = True) -> None:
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._done = threading.Event()
        watched = launcher_processes() if watch else []
        if watched:
            threading.Thread(target=self._watch, args=(watched,), name="launcher-watch", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def _watch(self, watched: list[tuple[int, int]]) -> None:
        """Polls, every second, that each watched process still has the parent it had at start: a process
        that died has its children re-parented, and unlike a pid check this cannot be fooled by pid reuse."""
        while not self._done.wait(WATCH_INTERVAL_S):
            for pid, parent in watched:
                if _parent_of(pid) != parent:
                    self.signal_name = self.signal_name or f"launcher (pid {parent}) gone"
                    return

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks together)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce(flag, op=dist.ReduceOp.MAX).item())

    def restore(self) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def launcher_processes(pid: int | None = None) -> list[tuple[int, int]]:
    """(child, parent) pairs whose link must hold while this rank runs: this process and its launcher
    (DeepSpeed's launch.py or torchrun), and the launcher and the `deepspeed` command above it. Empty for a
    rank started by hand (`python train.py`), whose parent is a shell that may well exit first."""
    pid = pid or os.getpid()
    parent = _parent_of(pid)
    if parent is None or not any(name in _command(parent) for name in _LAUNCHERS):
        return []
    pairs = [(pid, parent)]
    grandparent = _parent_of(parent)
    if grandparent is not None and "deepspeed.launcher.launch" in _command(parent) and _is_deepspeed_command(grandparent):
        pairs.append((parent, grandparent))
    return pairs


def _parent_of(pid: int) -> int | None:
    try:  # the command name in field 2 may hold spaces and parentheses: split after the last ")"
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _is_deepspeed_command(pid: int) -> bool:
    """The `deepspeed` console script (python .../bin/deepspeed ...) or `python -m deepspeed.launcher.runner`."""
    words = _command(pid).split()
    return any(Path(word).name == "deepspeed" or word == "deepspeed.launcher.runner" for word in words[:3])
