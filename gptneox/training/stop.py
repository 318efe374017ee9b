"""Graceful stop: on SIGTERM, SIGHUP, Ctrl-C, or the death of the launcher, every rank saves at the next step
boundary and exits with STOPPED_EXIT.

Whatever is signalled, the ranks agree on the stop through a collective, so one signalled rank stops them all.
DeepSpeed's per-node launcher forwards SIGTERM and SIGINT to the ranks, then kills them 30 s later; the
single-node `deepspeed` command above it forwards nothing and just dies. So each rank also watches its
launcher processes (the per-node launcher, and the `deepspeed` command above it) and stops as if signalled
when one of them is gone: otherwise killing the command would leave the ranks training with nobody waiting.

The request is made first thing in the command, before the data, the model and DeepSpeed are set up. Until
the loop's first step there is nothing to save, so a request then ends the rank at once (StoppedBeforeTraining,
unwinding through the lock's release); from the first step on it is honoured at the next step boundary, or
between two micro-batches of a step (gptneox.training.step). Once a stop is under way, further signals are
recorded and change nothing, up to the exit: a Ctrl-C at a terminal already reaches a rank twice (directly,
and forwarded by the launcher), and the launcher sends SIGTERM to the last ranks when the first exits 75.
Only SIGKILL ends a rank sooner; the checkpoint it was writing is then incomplete and a resume passes it over.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

# EX_TEMPFAIL of sysexits.h ("temporary failure, the user is invited to retry"): stopped early on request,
# with a checkpoint of the last finished step; rerun the command with --resume to continue.
STOPPED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCH_INTERVAL_S = 1.0
# A rank whose launcher died before its first step and that has not unwound this long after (stuck in a C
# call that never returns to Python, such as a rendezvous with a peer that is gone) leaves with os._exit.
START_STOP_GRACE_S = 60.0
_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torch.distributed.launch", "torchrun")


class StoppedBeforeTraining(BaseException):
    """A stop requested before the first step: nothing to save yet. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way out (the lock's release, on_rank_zero) takes it for an error."""


class StopRequest:
    """Installs handlers for SIGTERM, SIGHUP and SIGINT and starts the launcher watch. Before
    `at_step_boundaries` a request raises StoppedBeforeTraining in the main thread; after it, it only raises
    a flag that the loop reads (`agreed`). A request after the first is recorded in `repeated`, nothing else."""

    def __init__(self, watch: bool = True) -> None:
        self.signal_name: str | None = None
        self.repeated: list[str] = []
        self._before_training = True
        self._terminal_outputs = [fd for fd in (1, 2) if os.isatty(fd)]
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        self._done = threading.Event()
        self._watched = LAUNCHER_LINKS_AT_IMPORT if watch else []
        if self._watched:
            threading.Thread(target=self._watch, name="launcher-watch", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self._leave_terminal()
        if self.signal_name is None:
            self.signal_name = name
        elif not self._before_training:
            self.repeated.append(name)
            return
        if self._before_training:  # the first request, or the launcher watch interrupting the main thread
            self._before_training = False
            raise StoppedBeforeTraining(self.signal_name)

    def _leave_terminal(self) -> None:
        """After a hang-up, writing to the terminal fails (EIO), and a progress line would end the run before
        its save: what went to the terminal goes to /dev/null from now on."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in self._terminal_outputs:
            os.dup2(devnull, fd)
        os.close(devnull)

    def _watch(self) -> None:
        """Polls, every second, that each watched process still has the parent it had at start: a process
        that died has its children re-parented, and unlike a pid check this cannot be fooled by pid reuse."""
        while not self._done.wait(WATCH_INTERVAL_S):
            gone = self.launcher_gone()
            if gone is None:
                continue
            if self.signal_name is None:
                self.signal_name = gone
            if self._before_training:  # interrupt whatever the main thread waits in (a sleep, a socket read)
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
                if not self._done.wait(START_STOP_GRACE_S):
                    os._exit(STOPPED_EXIT)
            return

    def launcher_gone(self) -> str | None:
        """"launcher (pid N) gone" when a watched launcher process has died, else None."""
        for pid, parent in self._watched:
            if _parent_of(pid) != parent:
                return f"launcher (pid {parent}) gone"
        return None

    def at_step_boundaries(self) -> None:
        """From now on (the loop's first step) a request is honoured at the next step boundary."""
        self._before_training = False

    def explain_failure_before_training(self) -> str | None:
        """The signal or launcher death that an error raised before the first step comes from, else None.
        Both ranks stop at once when their launcher dies, and the one that leaves first breaks the collective
        that the other waits in: its error is the stop, not a bug. No later request raises anything."""
        if not self._before_training:
            return None
        reason = self.signal_name or self.launcher_gone()
        if reason is not None:
            self._before_training = False
        return reason

    def agreed(self, device) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks together)."""
        import torch  # here, so that importing this module (first thing in the command) does not import torch
        import torch.distributed as dist

        from gptneox.training.distributed import all_reduce

        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        return bool(all_reduce(flag, op=dist.ReduceOp.MAX).item())

    def restore(self) -> None:
        """End the watch and put the signal handlers found at start back."""
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


# Read when the command imports this module, first thing (gptneox/train.py), before the seconds that importing
# torch and DeepSpeed take: a launcher that dies during them has re-parented this rank by the time the
# StopRequest starts, and a link read then would no longer lead to it.
LAUNCHER_LINKS_AT_IMPORT = launcher_processes()
