#!/usr/bin/env python
"""Forward+backward time of SDPA attention over packed rows (segment_ids), three ways, on the same inputs:

  split     the backend now (gptneox.attention): one causal SDPA call per segment on split views of the
            flattened rows, outputs joined by one cat (backward: one cat per q, k, v)
  slices    the backend before: per-row, per-segment slices of [B, H, T, D] views, cat per row and over rows
            (backward: every slice zero-fills a full-size gradient)
  masked    one SDPA call per layer over the whole row with the block-diagonal causal mask (T^2 work)

The packed row comes from the real collator (DialogueCollator(pack=True)) on the conversations that
bench/train_throughput.py draws (`--lengths chat`: real chat lengths); q, k, v are views of one
[B * T, H * 3 * D] projection output, as in the model. Iterations alternate between the ways; best and median are reported.

    python bench/packed_attention.py                             # Pythia-70M heads, chat lengths, 8 x 1024
    python bench/packed_attention.py --heads 48 --head_dim 128   # StableLM-7B heads
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox.attention import attend  # noqa: E402
from gptneox.errors import run_command  # noqa: E402
from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402

import train_throughput  # noqa: E402  (bench/ is the script's own folder)


def by_slices(q, k, v, mask):
    """The per-segment slicing that gptneox.attention used before (kept here as the comparison)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = torch.cat([
        torch.cat([F.scaled_dot_product_attention(q[r:r + 1, :, a:b], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b],
                                                  is_causal=True) for a, b in spans], dim=2)
        for r, spans in enumerate(mask.segment_spans())])
    return out.transpose(1, 2)


def masked(q, k, v, mask):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.device)).transpose(1, 2)


WAYS = {"split": lambda q, k, v, mask: attend(q, k, v, mask, "sdpa"), "slices": by_slices, "masked": masked}


def packed_batch(args) -> dict:
    options = argparse.Namespace(lengths=args.lengths, seed=0, warmup=0, iters=1, accumulation=1,
                                 batch_size=args.batch_size, max_length=args.max_length)
    return train_throughput.collate_all(options, train_throughput.draw_batches(options), pack=True)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="chat", choices=["sample", "chat"])
    parser.add_argument("--batch_size", type=int, default=8, help="conversations per micro-batch")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    args = parser.parse_args(argv)

    batch = packed_batch(args)
    B, T = batch["input_ids"].shape
    H, D = args.heads, args.head_dim
    # the model's own reduction of the batch to an AttentionMask (trailing padding is one more segment)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
    mask = model._attention_mask(batch["input_ids"], batch["attention_mask"], batch["segment_ids"], None)
    segments = sum(len(spans) for spans in mask.segment_spans())
    torch.manual_seed(0)
    projection = torch.randn(B * T, H * 3 * D)
    grad = torch.randn(B, T, H, D)

    def step(way):
        qkv = projection.clone().requires_grad_()
        start = time.perf_counter()
        q, k, v = qkv.view(B, T, H, 3, D).unbind(dim=3)
        WAYS[way](q, k, v, mask).backward(grad)
        return time.perf_counter() - start, qkv.grad

    print(f"{B} rows x {T} tokens, {segments} segments (padding included), {H} heads x {D}, fp32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    reference = step(args.ways[0])[1]
    for way in args.ways[1:]:
        error = (step(way)[1] - reference).abs().max().item()
        print(f"  {way}: largest gradient difference from {args.ways[0]}: {error:.2e}")
    for _ in range(args.warmup):
        for way in args.ways:
            step(way)
    times = {way: [] for way in args.ways}
    for _ in range(args.iters):
        for way in args.ways:
            times[way].append(step(way)[0])
    for way, t in times.items():
        print(f"  {way:7s} forward+backward best {min(t) * 1000:8.1f} ms, median {statistics.median(t) * 1000:8.1f} ms")


if __name__ == "__main__":
    sys.exit(run_command("packed_attention.py", main))
