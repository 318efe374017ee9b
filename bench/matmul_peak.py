#!/usr/bin/env python
"""Measured matrix-multiply peak of this machine: the ceiling that MFU figures in bench/ divide by.

Large square matmuls, timed one at a time after a warm-up; the best rate of several runs is the peak
(the slowest runs measure the noise of a shared machine, not the hardware).

    python bench/matmul_peak.py                               # CPU, fp32
    python bench/matmul_peak.py --device cuda --dtype bf16 --size 8192
"""
import argparse
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: str = "cpu", dtype: str = "fp32", sizes=(2048, 3072), repeats: int = 5) -> float:
    """Best TFLOP/s of [n, n] @ [n, n] over `repeats` timed runs for each n in `sizes`."""
    device = torch.device(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(DTYPES[dtype])
        b = torch.randn(n, n, device=device).to(DTYPES[dtype])
        a @ b  # warm-up: thread pool, kernel selection, caches
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            a @ b
            _synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--size", type=int, nargs="+", default=[2048, 3072], help="square matrix sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    peak = matmul_peak_tflops(args.device, args.dtype, tuple(args.size), args.repeats)
    print(f"{args.device} {args.dtype} matmul peak: {peak:.4f} TFLOP/s (best of {args.repeats} per size "
          f"{args.size}, {torch.get_num_threads()} threads, torch {torch.__version__})")


if __name__ == "__main__":
    main()
