"""Per-step metrics: a JSONL file (the record), TensorBoard when installed, a tqdm bar on rank 0; and the
pieces of an honest MFU figure (accelerator peak, memory high-water mark).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: (16-bit tensor core, fp32 without TF32).
GPU_PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),        # SXM
    "A100": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "A10G": (70.0, 31.2),
    "L4": (121.0, 30.3),
    "V100": (125.0, 15.7),
}


def measured_cpu_peak_tflops(size: int = 2048, repeats: int = 4) -> float:
    """Best fp32 matmul rate of this CPU over a few runs: the practical ceiling for MFU on CPU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def peak_tflops(dtype: str, configured: float | None) -> tuple[float, str]:
    """Per-device peak TFLOP/s and where the figure came from."""
    if configured:
        return configured, "peak_tflops key"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (half, single) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (single if dtype == "fp32" else half), f"data sheet for {key}"
        return 0.0, f"unknown GPU {name!r}: set peak_tflops for an MFU figure"
    return measured_cpu_peak_tflops(), "measured fp32 matmul peak of this CPU"


def peak_memory_gb() -> float:
    """CUDA max allocated, or on CPU the process's resident-set high-water mark."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Writes one JSON object per call to OUTPUT_DIR/metrics.jsonl (rank 0 only) and mirrors it elsewhere."""

    def __init__(self, output_dir: str | Path, tensorboard_dir: str | Path, total_steps: int, initial_step: int,
                 enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir))
        except ImportError:  # tensorboard is optional
            self.writer = None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def log(self, step: int, values: dict, advance: bool = False, show: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        if advance:
            self.bar.update(1)
        if show:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()
                                  if k in ("loss", "lr", "grad_norm", "mfu")})

    def write(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()
