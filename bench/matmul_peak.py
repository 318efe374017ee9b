#!/usr/bin/env python
"""Measured matrix-multiply peak of this machine: the ceiling that MFU figures in bench/ divide by.

Large square matmuls, timed one at a time after a warm-up; the best rate of several runs is the peak
(the slowest runs measure the noise of a shared machine, not the hardware).

    python bench/matmul_peak.py                               # CPU, fp32
    python bench/matmul_peak.py --device cuda --dtype bf16 --size 8192
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptneox.dtypes import DTYPE_HELP, TORCH_DTYPES, dtype_name  # noqa: E402
from gptneox.training.metrics import matmul_peak_tflops  # noqa: E402
from gptneox.errors import run_command  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", type=dtype_name, choices=list(TORCH_DTYPES), metavar="DTYPE",
                        help=DTYPE_HELP)
    parser.add_argument("--size", type=int, nargs="+", default=[2048, 3072], help="square matrix sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    peak = matmul_peak_tflops(args.device, args.dtype, tuple(args.size), args.repeats)
    print(f"{args.device} {args.dtype} matmul peak: {peak:.4f} TFLOP/s (best of {args.repeats} per size "
          f"{args.size}, {torch.get_num_threads()} threads, torch {torch.__version__})")


if __name__ == "__main__":
    sys.exit(run_command("matmul_peak.py", main))
