"""Per-step metrics: a JSONL file (the record), the `report_to` backends (TensorBoard, W&B) under grouped
tags, a tqdm bar on rank 0; the rates of a step (tokens/s, MFU) computed from what the step reports; the
accelerator peak that MFU divides by; and reading a run's metrics.jsonl back (the demo, the plot).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from gptneox.attention import flex_compilations
from gptneox.dtypes import torch_dtype
from gptneox.errors import UserError
from gptneox.memory import peak_memory_record
from gptneox.training.output_dir import METRICS_FILE
from gptneox.training.reporting import open_writers
from gptneox.training.storage import write_atomically

if TYPE_CHECKING:
    from gptneox.training.step import StepResult

EVAL_PREFIX = "eval_"

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: (16-bit tensor core, fp32 without TF32), keyed by
# the exact torch.cuda.get_device_name(): a substring match gave "H100 NVL" the SXM figure and "L40" the L4's.
_H100_SXM, _H100_NVL, _A100, _V100_SXM = (989.0, 67.0), (835.0, 60.0), (312.0, 19.5), (125.0, 15.7)
GPU_PEAK_TFLOPS = {
    "NVIDIA H200": _H100_SXM,
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H100 PCIe": (756.0, 51.0),
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA L40S": (362.0, 91.6),
    "NVIDIA L40": (181.0, 90.5),
    "NVIDIA L4": (121.0, 30.3),
    "NVIDIA A10G": (70.0, 31.2),
    "Tesla V100-SXM2-16GB": _V100_SXM,
    "Tesla V100-SXM2-32GB": _V100_SXM,
    "Tesla V100-PCIE-16GB": (112.0, 14.0),
    "Tesla V100-PCIE-32GB": (112.0, 14.0),
}


def matmul_peak_tflops(device: str = "cpu", dtype: str = "fp32", sizes=(2048,), repeats: int = 4) -> float:
    """Best TFLOP/s of [n, n] @ [n, n] over `repeats` timed runs for each n in `sizes`: the practical
    ceiling for MFU where no data-sheet peak applies (the slowest runs measure a shared machine's noise)."""
    device = torch.device(device)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    best = 0.0
    # its own generator: a resume measures after restoring the global RNG, which dropout then draws from
    generator = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, device=device, generator=generator).to(torch_dtype(dtype))
        b = torch.randn(n, n, device=device, generator=generator).to(torch_dtype(dtype))
        a @ b  # warm-up: thread pool, kernel selection, caches
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            a @ b
            synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def peak_tflops(dtype: str, configured: float | None, device: torch.device | str = "cpu") -> tuple[float, str]:
    """Per-device peak TFLOP/s of the device the run trains on, and where the figure came from."""
    if configured:
        return configured, "peak_tflops key"
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if name in GPU_PEAK_TFLOPS:
            half, single = GPU_PEAK_TFLOPS[name]
            return (single if dtype == "fp32" else half), f"data sheet for {name}"
        return 0.0, f"unknown GPU {name!r}: set peak_tflops for an MFU figure"
    return matmul_peak_tflops(), "measured fp32 matmul peak of this CPU"


class MetricsError(UserError, ValueError):
    """A metrics.jsonl that cannot be read, or holds nothing to show."""


def flex_record() -> dict:
    """The compiled FlexAttention kernel's compilations so far, once it has run (CUDA only): a figure that
    keeps climbing means shapes are not bucketed and torch will fall back to the unfused kernel."""
    count = flex_compilations()
    return {"flex_compilations": count} if count else {}


def eval_key(dataset: str | None, metric: str) -> str:
    """The record key of an evaluation figure: eval_NAME_loss, eval_NAME_accuracy; for all sets together
    (dataset None) the Trainer's eval_loss, eval_accuracy."""
    return f"{EVAL_PREFIX}{dataset}_{metric}" if dataset else f"{EVAL_PREFIX}{metric}"


def eval_loss_keys(records: list[dict]) -> list[str]:
    """The evaluation-loss keys present in any record, sorted."""
    return sorted({k for r in records for k in r if k.startswith(EVAL_PREFIX) and k.endswith("_loss")})


def eval_dataset(key: str) -> str:
    """The evaluation set an eval_NAME_METRIC key is about (NAME may itself hold underscores); "" for the
    figures over all sets (eval_loss)."""
    return key[len(EVAL_PREFIX):].rpartition("_")[0]


# Record keys whose tag is not train/KEY: the Hugging Face Trainer's name for the learning rate.
_TRAIN_TAGS = {"lr": "learning_rate"}


def report_tag(key: str) -> str:
    """The backends' tag of a record key: eval_NAME_loss is eval/NAME/loss, eval_loss (all sets) eval/loss as
    the Trainer tags it, lr is train/learning_rate, any other key train/KEY."""
    if key.startswith(EVAL_PREFIX):
        dataset = eval_dataset(key)
        return f"eval/{dataset + '/' if dataset else ''}{key.rpartition('_')[2]}"
    return f"train/{_TRAIN_TAGS.get(key, key)}"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order; a bad line is an error naming it."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise MetricsError(f"{path}:{number}: not a JSON line ({err})") from None
    return records


def last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the newest winning: files written before resumes cut them (MetricsLogger) repeat
    the steps a resume trained again."""
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def _step_of(line: str) -> float:
    """A metrics line's step; infinite for a line a killed run left half written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _json_number(value):
    """null for NaN and infinities: json.dumps would write bare NaN/Infinity, which strict JSON readers refuse."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Writes one JSON object per call to OUTPUT_DIR/metrics.jsonl (rank 0 only) and the same figures to the
    `report_to` backends (gptneox.training.reporting; TensorBoard in `log_dir`, W&B given `run_config`).

    `peak_tflops` (per device) and `world_size` turn a step's FLOPs into MFU (no MFU when the peak is 0);
    `show_every` steps refresh the progress bar."""

    def __init__(self, output_dir: str | Path, total_steps: int, initial_step: int, enabled: bool, *,
                 report_to: list[str] = (), log_dir: str | Path | None = None, run_config: dict | None = None,
                 peak_tflops: float = 0.0, world_size: int = 1, show_every: int = 1,
                 device: torch.device | str = "cpu"):
        self.enabled, self.device = enabled, torch.device(device)
        self.peak_tflops, self.world_size, self.show_every = peak_tflops, world_size, show_every
        self.path = Path(output_dir) / METRICS_FILE
        self.writers = []
        self.bar = None
        if not enabled:
            return
        dropped = self._cut_after(initial_step)
        self.file = open(self.path, "a")
        self.writers = open_writers(list(report_to), log_dir=log_dir, output_dir=output_dir,
                                    config=run_config or {}, resumed_at=initial_step)
        if dropped:
            self.write(f"{self.path}: {dropped} record(s) after step {initial_step} dropped (the interrupted "
                       "run's; the resume trains those steps again)")
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def _cut_after(self, step: int) -> int:
        """Drop the records after `step` (a resume's checkpoint: the steps after it were trained by a run that
        stopped before saving them, and are trained again), so the file reads as one uninterrupted run; a
        crash meanwhile leaves the whole old file."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step and line.endswith("\n")]
        if len(kept) == len(lines):
            return 0
        write_atomically(self.path, "".join(kept))
        return len(lines) - len(kept)

    def log(self, step: int, values: dict, advance: bool = False, show: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _json_number(v) for k, v in values.items()}}
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        tags = {report_tag(k): v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self.writers:
            writer.log(tags, step)
        if advance:
            self.bar.update(1)
        if show:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()  # no MFU on an unknown GPU
                                  if k in ("loss", "lr", "grad_norm", "mfu") and v is not None})

    def step_record(self, result: StepResult, seconds: float, epoch: float) -> dict:
        """The figures of one optimizer step that took `seconds` (batch preparation included)."""
        peak = self.peak_tflops * 1e12 * self.world_size
        return {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                "skipped_steps": result.skipped_steps, "epoch": epoch,
                "tokens_per_s": result.tokens / seconds, "trained_tokens_per_s": result.trained_tokens / seconds,
                "mfu": result.flops / seconds / peak if peak else None,
                **peak_memory_record(self.device), **flex_record()}

    def log_step(self, step: int, result: StepResult, seconds: float, epoch: float) -> None:
        if not self.enabled:  # the record is rank 0's: other ranks need not read their memory figures
            return
        self.log(step, self.step_record(result, seconds, epoch), advance=True, show=step % self.show_every == 0)

    def log_eval(self, step: int, results: dict[str, float]) -> None:
        if results:
            self.log(step, results, show=False)
            self.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def write(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        for writer in self.writers:
            writer.close()
