#!/usr/bin/env python
"""The measurements of bench/gpu_check.sh, one subcommand each; every one writes OUT/NAME.json with a
`status` (PASS, FAIL or SKIP), a one-line `summary` and its figures, so the shell script can print one table.

    python bench/gpu_check.py parity OUT      # sdpa/flex/flash against the fp32 eager reference
    python bench/gpu_check.py loss OUT        # chunked loss in fp16 against fp32 at StableLM-7B scale
    python bench/gpu_check.py layers OUT      # 7B-shaped layers, 4 x 4096 packed, checkpointing: memory, MFU
    python bench/gpu_check.py decode OUT      # ms/token with padded and unpadded prompts per backend
    python bench/gpu_check.py checkpoint DIR  # a random 2-layer model with 7B's heads for train.py
    python bench/gpu_check.py train ARGS...   # train.py's main, with --overflow_steps N,M injected
    python bench/gpu_check.py resume OUT A B  # steps after a resume against the uninterrupted run, loss scale
    python bench/gpu_check.py environment X   # torch's version and which version-dependent paths it takes
    python bench/gpu_check.py summary OUT     # the table of every OUT/*.json

--cpu runs the same code on tiny shapes in fp32 (what the CPU test suite checks); without it CUDA is required.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402
from gptneox.attention import AttentionBackendError, AttentionMask, attend, check_backend  # noqa: E402
from gptneox.flops import training_flops  # noqa: E402
from gptneox.generate import generate  # noqa: E402
from gptneox.memory_plan import parameter_counts  # noqa: E402
from gptneox.training.loss import batch_loss, masked_cross_entropy_from_hidden  # noqa: E402
from gptneox.training.metrics import peak_tflops  # noqa: E402

STABLELM_7B = "stablelm-base-alpha-7b"
FLEX_HEAD_DIM = 128  # parity compiles FlexAttention (seconds per shape) for StableLM-7B's head size only
LOSS_SCALE = 2.0 ** 16  # ds_config.json's initial_scale_power
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}  # floor of the parity bound


def setting(cpu: bool) -> dict:
    """Shapes and dtypes: the real ones on a GPU, tiny fp32 ones for the CPU run of the same code."""
    if cpu:
        return dict(device=torch.device("cpu"), dtypes=[torch.float32], head_dims=[16], seq=32, heads=2,
                    model=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=512),
                    layers=1, rows=2, row_length=128, loss_rows=256, loss_hidden=64, decode_prompt=16, decode_new=8)
    return dict(device=torch.device("cuda"), dtypes=[torch.float16, torch.bfloat16], head_dims=[64, 80, 128],
                seq=256, heads=8, model={}, layers=2, rows=4, row_length=4096, loss_rows=16384, loss_hidden=6144,
                decode_prompt=256, decode_new=64)


BACKENDS = ("sdpa", "flex", "flash")


def usable(backend: str, device: torch.device, dtype: torch.dtype, training: bool) -> str | None:
    """None if the backend runs here, else why not (the SKIP reason)."""
    try:
        check_backend(backend, device, dtype, training=training)
    except AttentionBackendError as err:
        return str(err)
    return None


def runnable_backends(rows: list, device: torch.device, dtype: torch.dtype, training: bool, row: dict | None = None):
    """The backends that run here, in turn; each one that does not gets a SKIP row (`row` plus its reason)."""
    for backend in BACKENDS:
        why = usable(backend, device, dtype, training)
        if why:
            rows.append({**(row or {}), "backend": backend, "status": "SKIP", "reason": why})
        else:
            yield backend


# ----------------------------------------------------------------------------- parity
def parity_cases(B: int, T: int, device) -> dict:
    """AttentionMask of each case the model builds: plain causal, left padding, packed rows, a decoding step."""
    padding = torch.ones(B, T, dtype=torch.bool, device=device)
    padding[0, : T // 3] = False
    lengths = [T // 4, T // 2, T - T // 4 - T // 2]
    segments = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)]).expand(B, T)
    return {"causal": AttentionMask(B, T, T),
            "padding": AttentionMask(B, T, T, padding=padding),
            "packed": AttentionMask(B, T, T, segments=segments.contiguous()),
            "cache": AttentionMask(B, 1, T, padding=padding, cached=True, left_padded=True)}


def run_parity(out: Path, cpu: bool) -> dict:
    s = setting(cpu)
    device, B, H, T = s["device"], 2, s["heads"], s["seq"]
    rows, failures = [], []
    generator = torch.Generator(device=device).manual_seed(0)
    for dtype in s["dtypes"]:
        for D in s["head_dims"]:
            for case, mask in parity_cases(B, T, device).items():
                q = torch.randn(B, mask.query_length, H, D, device=device, generator=generator)
                k, v = (torch.randn(B, T, H, D, device=device, generator=generator) for _ in range(2))
                # Rows of real tokens: the backends agree on them. A padded query attends to itself in
                # eager/sdpa/flex and is dropped by flash's varlen path, so its output and the gradients it
                # sends to its own q/k/v differ by construction and are not compared.
                keys = mask.padding if mask.padding is not None else torch.ones(B, T, dtype=torch.bool, device=device)
                real = {"out": keys[:, -mask.query_length:], "dq": keys[:, -mask.query_length:], "dk": keys, "dv": keys}
                grads = case != "cache"  # decoding runs under inference_mode
                reference = _attention(q, k, v, mask, "eager", grads)  # fp32 inputs: the reference
                eager_half = _attention(*(t.to(dtype) for t in (q, k, v)), mask, "eager", grads)
                base_row = dict(dtype=str(dtype).replace("torch.", ""), head_dim=D, case=case)
                for backend in runnable_backends(rows, device, dtype, training=False, row=base_row):
                    row = {**base_row, "backend": backend}
                    if backend == "flex" and not cpu and D != FLEX_HEAD_DIM:
                        rows.append({**row, "status": "SKIP", "reason": f"flex compiles per shape: head dim "
                                                                         f"{FLEX_HEAD_DIM} only, to fit the lease"})
                        continue
                    backward = grads and usable(backend, device, dtype, training=True) is None
                    row["compared"] = "output and q/k/v gradients" if backward else "output"
                    try:
                        result = _attention(*(t.to(dtype) for t in (q, k, v)), mask, backend, backward)
                    except Exception as err:  # a kernel that refuses a shape is a finding, not a crash
                        rows.append({**row, "status": "FAIL", "reason": f"{type(err).__name__}: {err}"})
                        failures.append(row)
                        continue
                    errors = {}
                    for name in result:
                        ref, got, base = (r[name][real[name]] for r in (reference, result, eager_half))
                        bound = max(2 * (base.float() - ref).abs().max().item(), TOLERANCE[dtype])
                        errors[name] = ((got.float() - ref).abs().max().item(), bound)
                    ok = all(err <= bound for err, bound in errors.values())
                    rows.append({**row, "status": "PASS" if ok else "FAIL",
                                 "max_error": {n: e for n, (e, _) in errors.items()},
                                 "bound": {n: b for n, (_, b) in errors.items()}})
                    if not ok:
                        failures.append(row)
    ran = [r for r in rows if r["status"] != "SKIP"]
    forward_only = sum(r.get("compared") == "output" for r in ran)
    skipped = sorted({f"{r['backend']}: {r['reason'][:90]}" for r in rows if r["status"] == "SKIP"})
    return dict(status="FAIL" if failures else "PASS" if ran else "SKIP",
                summary=f"{len(ran) - len(failures)}/{len(ran)} within 2x the {'/'.join(map(str, s['head_dims']))}"
                        f" eager error ({forward_only} forward only); {len(rows) - len(ran)} skipped" + (f" ({'; '.join(skipped)})" if skipped else ""),
                rows=rows)


def _attention(q, k, v, mask, backend, grads: bool) -> dict:
    q, k, v = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    with torch.inference_mode(not grads):
        out = attend(q, k, v, mask, backend)
    result = {"out": out.detach().float()}
    if grads:
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)  # a fixed upstream grad
        (out.float() * weights).sum().backward()
        result.update(dq=q.grad.float(), dk=k.grad.float(), dv=v.grad.float())
    return result


# ----------------------------------------------------------------------------- chunked loss
def run_loss(out: Path, cpu: bool) -> dict:
    s = setting(cpu)
    device, vocab = s["device"], GPTNeoXConfig.from_name(STABLELM_7B).vocab_size
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(s["loss_rows"], s["loss_hidden"], device=device, generator=generator)
    head = 0.02 * torch.randn(vocab, s["loss_hidden"], device=device, generator=generator)
    targets = torch.randint(0, vocab, (s["loss_rows"],), device=device, generator=generator)
    mask = torch.rand(s["loss_rows"], device=device, generator=generator) < 0.7
    results = {}
    for dtype in (torch.float32, *([torch.float16] if cpu else s["dtypes"])):  # fp16 on CPU: tiny, and the point
        h, w = hidden.to(dtype).detach().requires_grad_(), head.to(dtype).detach().requires_grad_()
        total, count = masked_cross_entropy_from_hidden(h, w, targets, mask)
        # as training does: DeepSpeed scales an fp16 loss (2^16 at the start, ds_config.json) before the
        # backward, so small gradients do not underflow, and unscales the gradients before the update
        scale = LOSS_SCALE if dtype == torch.float16 else 1.0
        (total / count * scale).backward()
        results[dtype] = (total.item() / count.item(), h.grad.float() / scale, w.grad.float() / scale)
    ref_loss, ref_dh, ref_dw = results[torch.float32]
    rows = []
    for dtype, (loss, dh, dw) in results.items():
        if dtype == torch.float32:
            continue
        relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
        rows.append(dict(dtype=str(dtype), loss=loss, fp32_loss=ref_loss, loss_relative=abs(loss - ref_loss) / ref_loss,
                         grad_hidden_relative=relative(dh, ref_dh), grad_head_relative=relative(dw, ref_dw)))
    ok = all(r["loss_relative"] < 1e-3 and r["grad_hidden_relative"] < 1e-2 and r["grad_head_relative"] < 1e-2
             for r in rows)
    shape = f"{s['loss_rows']} rows x hidden {s['loss_hidden']} x vocab {vocab}"
    return dict(status="PASS" if ok else "FAIL", rows=rows, summary=f"{shape}: " + ", ".join(
        f"{r['dtype'].replace('torch.', '')} loss rel {r['loss_relative']:.1e}, grad rel "
        f"{max(r['grad_hidden_relative'], r['grad_head_relative']):.1e}" for r in rows))


# ----------------------------------------------------------------------------- 7B-shaped layers
def packed_batch(rows: int, length: int, vocab: int, device, seed: int = 0) -> tuple[dict, list[int]]:
    """Rows of conversations laid end to end, as the collator packs them, with random lengths 200..1500."""
    generator = torch.Generator().manual_seed(seed)
    segment_ids, positions, lengths = [], [], []
    for _ in range(rows):
        row_segments, row_positions, used = [], [], 0
        while used < length:
            n = min(int(torch.randint(200, 1500, (1,), generator=generator)), length - used)
            row_segments += [len(lengths)] * n
            row_positions += list(range(n))
            lengths.append(n)
            used += n
        segment_ids.append(row_segments)
        positions.append(row_positions)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": torch.ones(rows, length, dtype=torch.bool),
             "position_ids": torch.tensor(positions), "segment_ids": torch.tensor(segment_ids),
             "attention_mask": torch.ones(rows, length, dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()}, lengths


def run_layers(out: Path, cpu: bool, steps: int = 3) -> dict:
    s = setting(cpu)
    device = s["device"]
    dtype = torch.float32 if cpu else torch.bfloat16
    config = GPTNeoXConfig.from_name(STABLELM_7B, num_hidden_layers=s["layers"], **s["model"])
    batch, lengths = packed_batch(s["rows"], s["row_length"], config.vocab_size, device)
    flops = training_flops(config, lengths, int(batch["loss_mask"].sum()))
    peak, peak_source = peak_tflops("fp32" if cpu else "bf16", None, device)
    rows = []
    for backend in runnable_backends(rows, device, dtype, training=True):
        torch.manual_seed(0)
        with device:  # initialised where it runs: a 7B-shaped init on the CPU takes longer than the steps
            model = GPTNeoX(config).to(dtype=dtype).train()
        model.gradient_checkpointing = True
        model.attention_backend = backend
        parameters = sum(p.numel() for p in model.parameters())
        try:
            seconds = _timed_steps(model, batch, steps, device)
        except Exception as err:
            rows.append(dict(backend=backend, status="FAIL", reason=f"{type(err).__name__}: {err}"))
            del model
            continue
        row = dict(backend=backend, status="PASS", step_s=seconds, tokens_per_s=sum(lengths) / seconds,
                   tflops=flops / seconds / 1e12, mfu=flops / seconds / 1e12 / peak if peak else None,
                   parameters=parameters)
        if device.type == "cuda":
            row.update(peak_allocated_gb=torch.cuda.max_memory_allocated(device) / 2**30,
                       peak_reserved_gb=torch.cuda.max_memory_reserved(device) / 2**30)
            row["zero2_8_rank_projection_gb"] = zero2_projection(config, row["peak_allocated_gb"], parameters)
        rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ran = [r for r in rows if r["status"] == "PASS"]
    status = "FAIL" if any(r["status"] == "FAIL" for r in rows) else "PASS" if ran else "SKIP"
    summary = "; ".join(f"{r['backend']} {r['tokens_per_s']:,.0f} tok/s"
                        + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else "")
                        + (f", peak {r['peak_allocated_gb']:.1f}/{r['peak_reserved_gb']:.1f} GB alloc/reserved, "
                           f"8-rank ZeRO-2 ~{r['zero2_8_rank_projection_gb']:.0f} GB" if "peak_allocated_gb" in r else "")
                        for r in ran) or "no backend ran"
    return dict(status=status, rows=rows, peak_tflops=peak, peak_source=peak_source,
                shape=f"{config.num_hidden_layers} x StableLM-7B layers, {s['rows']} x {s['row_length']} packed",
                summary=summary)


def _timed_steps(model, batch, steps: int, device) -> float:
    """Median seconds of forward + chunked loss + backward, after one warm-up step (compilation, autotuning)."""
    times = []
    for index in range(steps + 1):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if index == 1:
                torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        total, count = batch_loss(model, batch)
        (total / count).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def zero2_projection(config: GPTNeoXConfig, measured_gb: float, measured_parameters: int, ranks: int = 8) -> float:
    """Estimated per-rank peak of the full 16-layer model under ZeRO-2 on `ranks` GPUs, in GiB: 16-bit weights,
    a 1/ranks share of fp32 master weights and Adam moments (12 bytes) and of 16-bit gradients, the 1e9-element
    reduce bucket of ds_config.json, and the measured activations per layer times the layer count. An estimate
    from this run's measurement, not a measurement of 8 ranks."""
    full = GPTNeoXConfig.from_name(STABLELM_7B)
    P = parameter_counts(full, persistence_threshold=0).total
    activations_per_layer = max(measured_gb * 2**30 - 4 * measured_parameters, 0) / config.num_hidden_layers
    total = 2 * P + (12 + 2) * P / ranks + 2 * 1e9 + activations_per_layer * full.num_hidden_layers
    return total / 2**30


# ----------------------------------------------------------------------------- decoding
def run_decode(out: Path, cpu: bool) -> dict:
    s = setting(cpu)
    device = s["device"]
    dtype = torch.float32 if cpu else torch.float16
    torch.manual_seed(0)
    config = GPTNeoXConfig.from_name(STABLELM_7B, num_hidden_layers=s["layers"], **s["model"])
    with device:
        model = GPTNeoX(config).to(dtype=dtype).eval()
    n, new = s["decode_prompt"], s["decode_new"]
    ids = torch.randint(2, config.vocab_size, (4, n), device=device)
    unpadded = torch.ones(4, n, dtype=torch.long, device=device)
    padded = unpadded.clone()
    for row, keep in enumerate((n, 3 * n // 4, n // 2, n // 4)):
        padded[row, : n - keep] = 0
    rows = []
    for backend in runnable_backends(rows, device, dtype, training=False):
        model.attention_backend = backend
        row = dict(backend=backend, status="PASS")
        for name, mask in (("unpadded", unpadded), ("padded", padded)):
            # warm-up over the whole length: each new key length is a new shape for the kernels (on the H200 a
            # 2-token warm-up left the first backend measured at 61 ms/token, the next one, same kernels, at 3)
            generate(model, ids, mask, max_new_tokens=new, stop_token_ids=())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            generate(model, ids, mask, max_new_tokens=new, stop_token_ids=())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row[f"{name}_ms_per_token"] = (time.perf_counter() - start) / new * 1e3
        rows.append(row)
    ran = [r for r in rows if r["status"] == "PASS"]
    return dict(status="PASS" if ran else "SKIP", rows=rows,
                summary=f"batch 4, prompt {n}, {new} new: " + "; ".join(
                    f"{r['backend']} {r['unpadded_ms_per_token']:.2f} / {r['padded_ms_per_token']:.2f} ms/token "
                    "unpadded / padded" for r in ran))


# ----------------------------------------------------------------------------- train.py run
def train_model_config(cpu: bool) -> GPTNeoXConfig:
    """The train step's model: StableLM-7B's head size (128), rotary, vocabulary and layer layout at 2 layers of
    width 1024, so the same kernels and dtypes run while a ZeRO-2 checkpoint (16-bit weights, fp32 master and
    Adam moments) stays near 1.8 GB instead of 21 GB."""
    if cpu:
        return GPTNeoXConfig.from_name(STABLELM_7B, num_hidden_layers=2, **setting(True)["model"])
    return GPTNeoXConfig.from_name(STABLELM_7B, num_hidden_layers=2, hidden_size=1024, num_attention_heads=8,
                                   intermediate_size=4096)


def make_checkpoint(directory: Path, cpu: bool) -> None:
    """A random model of train_model_config in fp16, saved the Hugging Face way, for train.py (built on the
    GPU: its initialisation on the CPU would be untimed work)."""
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else "cuda"):
        model = GPTNeoX(train_model_config(cpu)).to(torch.float32 if cpu else torch.float16)
    model.save_pretrained(directory)


class _OverflowInBackward(torch.autograd.Function):
    """Passes the loss through unchanged and sends back an infinite gradient: the fp16 overflow of a step, as
    DeepSpeed's loss scaler meets it, with a finite logged loss."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def run_training(argv: list[str]) -> int:
    """train.py's main in this process, with a gradient overflow injected at the optimizer steps given by
    --overflow_steps (no production setting does this: the check patches the loss function). With --cpu,
    DeepSpeed is told the CPU supports fp16, so the same loss-scaling path runs in the test suite."""
    parser = argparse.ArgumentParser(prog="gpu_check.py train")
    parser.add_argument("--overflow_steps", default="", help="comma list of optimizer steps whose backward overflows")
    parser.add_argument("--cpu", action="store_true")
    ours, train_argv = parser.parse_known_args(argv)
    steps = {int(x) for x in ours.overflow_steps.split(",") if x}
    from deepspeed.accelerator import get_accelerator
    from gptneox import train as train_command
    from gptneox.training import step as step_module
    if ours.cpu:
        get_accelerator().is_fp16_supported = lambda: True
    batch_loss_of = step_module.losses.batch_loss

    def batch_loss_overflowing(engine, batch):
        total, count = batch_loss_of(engine, batch)
        if engine.global_steps + 1 in steps:
            total = _OverflowInBackward.apply(total)
        return total, count

    step_module.losses = argparse.Namespace(batch_loss=batch_loss_overflowing)
    return train_command.main(train_argv)


def compare_resume(out: Path, straight: Path, resumed: Path, overflow_steps: set[int], cpu: bool) -> dict:
    """Losses of the steps after the resume against the uninterrupted run's, the fp16 loss scale around the
    injected overflows (skipped, scale halved after hysteresis, recovered), and the exported model loads."""
    from gptneox.training.metrics import last_per_step, read_metrics
    from gptneox.training.output_dir import METRICS_FILE

    def steps(run: Path) -> dict:  # training records only: an evaluation record shares its step
        return {r["step"]: r for r in last_per_step([r for r in read_metrics(run / METRICS_FILE) if "loss" in r])}
    a, b = steps(straight), steps(resumed)
    after = sorted(set(a) & set(b) - {min(a)})
    differences = {step: abs(a[step]["loss"] - b[step]["loss"]) for step in after}
    device = "cpu" if cpu else "cuda"
    exported = GPTNeoX.from_pretrained(straight, dtype=torch.float32, device=device)
    finite = bool(torch.isfinite(exported(torch.tensor([[1, 2, 3]], device=device))).all())
    exact = bool(after) and all(d == 0.0 for d in differences.values())
    close = bool(after) and all(d <= 1e-3 * abs(a[s]["loss"]) for s, d in differences.items())
    scale = {step: record["loss_scale"] for step, record in a.items()}
    skipped = sorted(step for step, record in a.items()
                     if record["skipped_steps"] > a.get(step - 1, {"skipped_steps": 0})["skipped_steps"])
    overflow = dict(injected=sorted(overflow_steps), skipped=skipped, loss_scale=scale)
    overflow_ok = True
    if overflow_steps:
        first, last = min(overflow_steps), max(overflow_steps)
        recovered = [s for s in a if s > last and s not in skipped]
        overflow_ok = (skipped == sorted(overflow_steps) and scale[last] < scale.get(first - 1, scale[first])
                       and bool(recovered) and all(math.isfinite(a[s]["loss"]) for s in recovered))
        overflow["recovered_at"] = min(recovered, default=None)
    status = "PASS" if close and finite and overflow_ok and all(math.isfinite(r["loss"]) for r in a.values()) else "FAIL"
    scales = " -> ".join(f"{scale[s]:g}" for s in sorted(scale))
    return dict(status=status, losses={s: r["loss"] for s, r in a.items()},
                resumed_losses={s: r["loss"] for s, r in b.items()}, differences=differences, overflow=overflow,
                exported_forward_finite=finite,
                summary=f"losses {', '.join(format(a[s]['loss'], '.4f') for s in sorted(a))}; after resume "
                        f"{'identical' if exact else 'max diff ' + format(max(differences.values(), default=0), '.2e')}"
                        f" at steps {after}; overflow at {sorted(overflow_steps)}: skipped {skipped}, loss scale "
                        f"{scales}; export loads: {finite}")


def copy_first_checkpoint(source: Path, target: Path) -> str:
    """A copy of `source` (a run's checkpoints/) holding only its oldest complete tag, as if the run had been
    stopped right after it: one checkpoint is copied, not every kept one."""
    from gptneox.training.checkpoint import POINTER
    pointer = json.loads((source / POINTER).read_text())
    first = pointer["complete"][0]
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name == POINTER or (path.name in pointer["complete"] and path.name != first):
            continue
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, target / path.name)
    (target / POINTER).write_text(json.dumps({"latest": first, "complete": [first]}))
    return first


def torch_paths() -> str:
    from gptneox.torch_support import version_dependent_paths
    return "\n".join(f"{name}: {path}" for name, path in version_dependent_paths().items())


# ----------------------------------------------------------------------------- summary
def summary_table(out: Path) -> str:
    lines = ["| check | status | seconds | result |", "| --- | --- | --- | --- |"]
    for path in sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime):
        record = json.loads(path.read_text())
        seconds = f"{record['seconds']:.0f}" if "seconds" in record else ""
        lines.append(f"| {path.stem} | {record.get('status', '?')} | {seconds} | {record.get('summary', '')} |")
    return "\n".join(lines)


CHECKS = {"parity": run_parity, "loss": run_loss, "layers": run_layers, "decode": run_decode}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # train.py's own arguments follow
        return run_training(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*CHECKS, "checkpoint", "resume", "copy-checkpoint", "summary", "record",
                                            "environment"])
    parser.add_argument("paths", nargs="+", type=Path, help="OUT (and for resume: the two run directories)")
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 shapes on the CPU")
    parser.add_argument("--status", help="record: PASS, FAIL or SKIP")
    parser.add_argument("--summary", default="", help="record: the one-line result")
    parser.add_argument("--seconds", type=float, help="record: how long the step took")
    parser.add_argument("--overflow_steps", default="", help="resume: the steps whose backward overflowed")
    args = parser.parse_args(argv)
    out = args.paths[0]
    if args.command == "summary":
        print(summary_table(out))
        return 0
    if args.command == "environment":
        print(torch_paths())
        return 0
    if args.command == "checkpoint":
        make_checkpoint(out, args.cpu)
        return 0
    if args.command == "copy-checkpoint":
        print(copy_first_checkpoint(out, args.paths[1]))
        return 0
    name = args.paths[1].name if args.command == "record" else args.command
    if args.command == "record":  # a step of the shell script (install, tests, train) as a table row
        result = dict(status=args.status, summary=args.summary)
    else:
        if not args.cpu and not torch.cuda.is_available():
            parser.error("no CUDA GPU here; --cpu runs the tiny CPU version")
        start = time.perf_counter()
        try:
            overflow = {int(x) for x in args.overflow_steps.split(",") if x}
            result = (compare_resume(out, *args.paths[1:3], overflow, args.cpu) if args.command == "resume"
                      else CHECKS[args.command](out, args.cpu))
        except Exception as err:
            result = dict(status="FAIL", summary=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        result["seconds"] = time.perf_counter() - start
    if args.seconds is not None:
        result["seconds"] = args.seconds
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{name}: {result['status']}: {result['summary']}", flush=True)
    return 0 if result["status"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
