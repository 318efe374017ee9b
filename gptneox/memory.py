"""Peak memory of this process: one definition for the training log and the benchmarks.

On CUDA it is the allocator's high-water mark; on CPU the resident-set high-water mark from
/proc/self/status (VmHWM, which unlike getrusage's ru_maxrss is not inherited from the parent across
exec, so a benchmark's fresh subprocess measures itself only).
"""
from __future__ import annotations

import resource

import torch


def status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM, VmRSS, ...) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_memory_mib(device: torch.device | str | None = None) -> float:
    """CUDA max allocated on a CUDA device (the current one by default when CUDA is available), else the
    process's resident-set high-water mark."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return status_mib("VmHWM")
    except (OSError, RuntimeError):  # no /proc (not Linux): getrusage reports KiB on Linux-likes
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_record(device: torch.device | str) -> dict:
    """The memory figures of one metrics record, since the previous record: on CUDA allocated and reserved
    (the caching allocator's footprint, what an out-of-memory error is about), then reset for the next
    logging window; on CPU the resident-set high-water mark, which cannot be reset."""
    device = torch.device(device)
    if device.type == "cuda":
        record = {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                  "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return record
    return {"peak_memory_gb": peak_memory_mib(device) / 1024}
