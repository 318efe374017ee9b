#!/usr/bin/env python
"""Training throughput, side by side on the same machine, model shape and conversations:

  A   reference stack: transformers.GPTNeoXForCausalLM, padded batches (right padding to the longest row,
      a multiple of 16, as the reference trainer), token-mean cross-entropy over trained targets of the
      full [B, T, vocab] logits (the reference loss)
  B   ours, padded batches, the same full-logits loss: our model against theirs, nothing else changed
  B2  ours, padded batches, the training loop's loss (logits of trained rows only, in chunks)
  C   ours, packed batches (conversations end to end, per-segment attention), the training loop's loss
  Cc  C with compiled blocks (compile: true; the compiling happens in the warm-up steps)
  AL  A with LoRA as a transformers + peft user runs it: peft's LoRA (same r, alpha, dropout, targets) on the
      frozen base, the chat tokens' embedding rows trained through peft's trainable_token_indices
  CL  C with LoRA: our adapters (gptneox.lora.add_lora, the same settings and chat-token rows), packed
      batches, the training loop's loss

One step = forward + backward on --accumulation micro-batches, then one AdamW step, as an optimizer step
of training (batches are collated before timing, as a data loader would). Timing: all variants live in
this process and take turns, one step each, so machine noise hits them alike (--rounds repeats the timed
steps); throughput is total tokens over total time of the timed steps, the step time their median.
Peak memory: each variant again in a fresh subprocess (set-up, then two steps), so its peak is its own:
RSS high-water (VmHWM) on CPU, max allocated on CUDA. Every variant sees the same batches: conversations
drawn from the bundled sample mix (configs/sample-mix.yaml, build_datasets) and tokenized by its bundled
tokenizer, no random truncation windows.

FLOPs: gptneox.flops.training_flops (blocks for every real token, attention within each conversation,
LM head for trained tokens only): the same useful work for every variant, divided by the matmul peak
measured at start (gptneox.training.metrics.matmul_peak_tflops; bench/matmul_peak.py runs it alone).

    python bench/train_throughput.py                                    # CPU fp32, Pythia-70M shape
    python bench/train_throughput.py --lengths chat --max_length 1024 --accumulation 2 --variants AL CL C
    python bench/train_throughput.py --device cuda --dtype bf16 --model stablelm-7b-layers --layers 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402
from gptneox.attention import AttentionBackendError, check_backend  # noqa: E402
from gptneox.data import CHAT_TOKENS, DialogueCollator, build_datasets, load_tokenizer  # noqa: E402
from gptneox.flops import conversation_lengths, training_flops  # noqa: E402
from gptneox.dtypes import dtype_name, torch_dtype  # noqa: E402
from gptneox.memory import peak_memory_mib  # noqa: E402
from gptneox.training.config import load_section, repo_path  # noqa: E402
from gptneox.training.metrics import matmul_peak_tflops  # noqa: E402
from gptneox.training.loss import DEFAULT_CHUNK_ROWS, batch_loss, masked_cross_entropy, model_inputs  # noqa: E402
from gptneox.errors import run_command  # noqa: E402
from gptneox.lora import LoraConfig, add_lora, parse_target_modules  # noqa: E402

VARIANTS = {
    "A": "transformers, padded, full-logits loss",
    "B": "gptneox, padded, full-logits loss",
    "B2": "gptneox, padded, chunked trained-rows loss",
    "C": "gptneox, packed, chunked trained-rows loss",
    "Cc": "gptneox, packed, chunked trained-rows loss, compiled blocks",
    "AL": "transformers + peft LoRA, padded, full-logits loss",
    "CL": "gptneox LoRA, packed, chunked trained-rows loss",
}
PACKED = ("C", "Cc", "CL")
LORA = ("AL", "CL")
REFERENCE = ("A", "AL")  # transformers' model and the reference loss
MODELS = {"pythia-70m": "pythia-70m", "stablelm-7b-layers": "stablelm-base-alpha-7b"}


def model_config(args) -> GPTNeoXConfig:
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return GPTNeoXConfig.from_name(MODELS[args.model], **overrides)


SAMPLE_MIX = load_section("sample-mix")


def chat_profile(sample: list[list], count: int, seed: int) -> list[list]:
    """`count` synthetic multi-turn conversations with the lengths of real chat data and a long tail.

    1 + Geometric(0.45) prompter/assistant pairs (at most 8); prompter messages LogNormal(median 180
    characters, sigma 0.9), assistant ones LogNormal(median 650, sigma 1.0), capped at 12,000: median
    conversation about 2,100 characters, a tail into tens of thousands. The text is the bundled sample's own
    messages laid end to end and cut at word boundaries, so it tokenizes like real text.
    """
    words = " ".join(m["text"] for conversation in sample for m in conversation).split()
    rng = np.random.default_rng(seed)
    conversations, cursor = [], 0

    def text(chars: int) -> str:
        nonlocal cursor
        out, size = [], 0
        while size < chars:
            out.append(words[cursor % len(words)])
            size += len(out[-1]) + 1
            cursor += 1
        return " ".join(out)

    for _ in range(count):
        pairs = min(int(rng.geometric(0.45)), 8)
        conversation = []
        for _ in range(pairs):
            conversation.append({"role": "prompter", "text": text(min(rng.lognormal(np.log(180), 0.9), 12000))})
            conversation.append({"role": "assistant", "text": text(min(rng.lognormal(np.log(650), 1.0), 12000))})
        conversations.append(conversation)
    return conversations


def draw_batches(args) -> list[list]:
    """(warmup + iters) x accumulation lists of batch_size conversations, without replacement while they last."""
    conversations, _ = build_datasets(SAMPLE_MIX["datasets"], cache_dir=repo_path(SAMPLE_MIX["cache_dir"]), seed=0)
    if args.lengths == "chat":
        conversations = chat_profile(conversations, 1000, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    count = (args.warmup + args.iters) * args.accumulation
    order = np.concatenate([rng.permutation(len(conversations)) for _ in range(
        -(-count * args.batch_size // len(conversations)))])
    return [[conversations[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]
            for k in range(count)]


def collate_all(args, batches, pack: bool) -> list[dict]:
    tokenizer = load_tokenizer(repo_path(SAMPLE_MIX["tokenizer_path"]))
    collate = DialogueCollator(tokenizer, max_length=args.max_length, random_offset_probability=0.0,
                               pad_to_multiple_of=16, pack=pack)
    return [collate(b) for b in batches]


def chat_token_ids() -> list[int]:
    tokenizer = load_tokenizer(repo_path(SAMPLE_MIX["tokenizer_path"]))
    return [tokenizer.token_to_id(token) for token in CHAT_TOKENS]


def lora_config(args) -> LoraConfig:
    return LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=parse_target_modules(args.lora_target_modules))


def peft_lora(reference, args):
    """peft's LoRA over the frozen reference model, as a TRL/peft user configures it."""
    import peft
    targets = args.lora_target_modules
    lora = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=targets if targets == "all-linear" else targets.split(","),
                           task_type="CAUSAL_LM", trainable_token_indices=(
                               {name: chat_token_ids() for name in ("embed_in", "lm_head")}
                               if args.lora_train_chat_tokens else None))
    return peft.get_peft_model(reference, lora)


def build_model(variant: str, config: GPTNeoXConfig, args, device, dtype):
    torch.manual_seed(args.seed)
    ours = GPTNeoX(config)
    if variant not in REFERENCE:
        ours.attention_backend = args.attention
        if variant == "CL":
            torch.manual_seed(args.seed)
            add_lora(ours, lora_config(args), chat_token_ids() if args.lora_train_chat_tokens else [])
        if variant == "Cc":
            ours.compile_blocks()
        return ours.to(device=device, dtype=dtype).train()
    import transformers
    hf_config = transformers.GPTNeoXConfig(**{k: v for k, v in config.to_hf().items()
                                              if k not in ("rotary_pct", "rotary_emb_base")})
    hf_config._attn_implementation = "flash_attention_2" if args.attention == "flash" else "sdpa"  # flex: sdpa
    reference = transformers.GPTNeoXForCausalLM(hf_config)
    reference.load_state_dict({k.replace("embed_out.", "lm_head."): v for k, v in ours.state_dict().items()})
    if variant == "AL":
        torch.manual_seed(args.seed)
        reference = peft_lora(reference, args)
    return reference.to(device=device, dtype=dtype).train()


def reference_loss(model, batch):
    """The reference trainer's loss: full logits, keep trained positions, per-token CE, sum / (n + 1e-8)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    mask = batch["loss_mask"].flatten()
    selected = logits.flatten(0, 1)[mask]
    losses = torch.nn.functional.cross_entropy(selected, batch["targets"].flatten()[mask], reduction="none")
    return losses.sum() / (mask.sum() + 1e-8)


def our_loss(model, batch, full_logits: bool, chunk_rows: int):
    if full_logits:
        total, count = masked_cross_entropy(model(batch["input_ids"], **model_inputs(batch)), batch["targets"],
                                            batch["loss_mask"])
    else:
        total, count = batch_loss(model, batch, chunk_rows)
    return total / count.clamp(min=1)


class Variant:
    """One variant's model, optimizer and collated batches; `step` runs and times one micro-batch."""

    def __init__(self, name: str, args, conversations: list[list]):
        self.name, self.args = name, args
        self.device, dtype = torch.device(args.device), torch_dtype(args.dtype)
        self.config = model_config(args)
        self.batches = [{k: v.to(self.device) for k, v in b.items()}
                        for b in collate_all(args, conversations, pack=name in PACKED)]
        self.model = build_model(name, self.config, args, self.device, dtype)
        # fused: the kernel the trainer uses on CPU (gptneox.training.ds_config), one pass per tensor
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-5, betas=(0.9, 0.95), eps=1e-12,
                                           weight_decay=0.0, fused=True)
        self.setup_mib = peak_memory_mib(self.device)
        self.first_loss = None
        self.steps: list[dict] = []

    def step(self, index: int, timed: bool) -> None:
        """Optimizer step `index`: its micro-batches forward and backward, then AdamW (one update)."""
        accumulation = self.args.accumulation
        batches = self.batches[index * accumulation:(index + 1) * accumulation]
        start = time.perf_counter()
        for batch in batches:
            if self.name in REFERENCE:
                loss = reference_loss(self.model, batch)
            else:
                loss = our_loss(self.model, batch, full_logits=self.name == "B",
                                chunk_rows=self.args.loss_chunk_rows)
            (loss / accumulation).backward()
            self.first_loss = float(loss.detach()) if self.first_loss is None else self.first_loss
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if timed:
            lengths = [n for batch in batches for n in conversation_lengths(batch)]
            trained = sum(int(batch["loss_mask"].sum()) for batch in batches)
            self.steps.append({"seconds": seconds, "tokens": sum(lengths), "trained": trained,
                               "cells": sum(batch["input_ids"].numel() for batch in batches),
                               "flops": training_flops(self.config, lengths, trained)})


def time_variants(names: list[str], args) -> dict[str, Variant]:
    """All variants in this process, one step each in turn, so machine noise hits them alike."""
    conversations = draw_batches(args)
    variants = {name: Variant(name, args, conversations) for name in names}
    for index in range(args.warmup):
        for variant in variants.values():
            variant.step(index, timed=False)
    for _ in range(args.rounds):
        for index in range(args.warmup, args.warmup + args.iters):
            for variant in variants.values():
                variant.step(index, timed=True)
    return variants


def measure_memory(name: str, args) -> dict:
    """In a fresh process: set-up memory, then the peak over one warm-up step and one more step."""
    variant = Variant(name, args, draw_batches(args)[:2 * args.accumulation])
    for index in range(2):
        variant.step(index, timed=False)
    return {"setup_mib": variant.setup_mib, "peak_mib": peak_memory_mib(variant.device)}


def memory_in_subprocess(name: str, argv: list[str]) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv, "--memory_worker", name], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory run of variant {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarize(variant: Variant, memory: dict, peak_tflops: float) -> dict:
    steps = variant.steps
    tokens, trained, cells, flops, seconds = (sum(s[k] for s in steps)
                                              for k in ("tokens", "trained", "cells", "flops", "seconds"))
    flop_rate = flops / seconds
    return {
        "tokens_per_s": tokens / seconds,
        "trained_per_s": trained / seconds,
        "step_s": statistics.median(s["seconds"] for s in steps),
        "padding": 1 - tokens / cells,
        "tflops": flop_rate / 1e12,
        "mfu": flop_rate / 1e12 / peak_tflops,
        "first_loss": variant.first_loss,
        "trained_parameters": sum(p.numel() for p in variant.trainable),
        "step_seconds": [s["seconds"] for s in steps],
        **memory,
    }


def mib(result: dict, key: str) -> str:
    return f"{result[key]:,.0f}" if key in result else "-"  # "-": not measured (--no_memory)


def data_sheet_peak(dtype: str, device) -> tuple[float, str]:
    from gptneox.training.metrics import peak_tflops
    return peak_tflops(dtype, None, device)


def machine_line(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", type=dtype_name, choices=["fp32", "bf16"], metavar="DTYPE",
                        help="weights, activations and AdamW state: fp32 or bf16 (float32, bfloat16 mean the same; "
                             "no fp16: it would need a loss scaler)")
    parser.add_argument("--model", default="pythia-70m", choices=sorted(MODELS),
                        help="pythia-70m (vocab 50304) or stablelm-7b-layers (StableLM-7B shape, vocab 50432)")
    parser.add_argument("--layers", type=int, default=None, help="number of layers (default: the model's)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "flex"],
                        help="attention kernels of both stacks (flash: flash-attn on CUDA, varlen when packed; "
                             "flex: FlexAttention for packed and padded rows, ours only, CUDA)")
    parser.add_argument("--batch_size", type=int, default=8, help="conversations per micro-batch")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (the stablelm-7b recipe uses 2, defaults 32)")
    parser.add_argument("--lengths", default="sample", choices=["sample", "chat"],
                        help="sample: the bundled conversations (about 70 tokens); chat: synthetic multi-turn "
                             "conversations of real chat lengths (median about 2,100 characters, long tail)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=1, help="pass over the timed batches this many times")
    parser.add_argument("--variants", nargs="+", default=["A", "B", "B2", "C"], choices=list(VARIANTS))
    parser.add_argument("--no_memory", action="store_true",
                        help="skip the peak-memory runs (a fresh process per variant, two more steps each)")
    parser.add_argument("--loss_chunk_rows", type=int, default=DEFAULT_CHUNK_ROWS)
    lora = parser.add_argument_group("LoRA variants (AL, CL): the same settings on both stacks; defaults: the "
                                     "bundled lora section")
    lora.add_argument("--lora_r", type=int, default=16)
    lora.add_argument("--lora_alpha", type=float, default=32)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument("--lora_target_modules", default="all-linear",
                      help="comma list of query_key_value, dense, dense_h_to_4h, dense_4h_to_h, or all-linear")
    lora.add_argument("--no_lora_chat_tokens", dest="lora_train_chat_tokens", action="store_false",
                      help="leave the chat tokens' embedding rows frozen too (default: trained with the adapters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the figures here (JSON)")
    parser.add_argument("--memory_worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:  # before any model is built: the backend against the device and dtype, and flash-attn's import
        check_backend(args.attention, args.device, torch_dtype(args.dtype), training=True)
    except AttentionBackendError as err:
        parser.error(str(err))

    if args.memory_worker:
        print(json.dumps(measure_memory(args.memory_worker, args)))
        return
    device = torch.device(args.device)
    forwarded = list(argv if argv is not None else sys.argv[1:])
    memory = {v: {} if args.no_memory else memory_in_subprocess(v, forwarded) for v in args.variants}
    sizes = (2048, 3072) if device.type == "cpu" else (4096, 8192)
    peak = matmul_peak_tflops(args.device, args.dtype, sizes, repeats=5)
    config = model_config(args)
    variants = time_variants(args.variants, args)
    results = {v: summarize(variants[v], memory[v], peak) for v in args.variants}

    print(f"machine: {machine_line(device)}")
    print(f"model: {args.model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
          f"{config.vocab_size}), {args.dtype}, attention {args.attention}; {args.batch_size} conversations x "
          f"max_length {args.max_length} ({args.lengths} lengths), {args.accumulation} micro-batch(es) per optimizer step; {args.warmup} "
          f"warm-up + {args.iters} timed steps x {args.rounds} "
          f"round(s) per variant, interleaved; loss chunk {args.loss_chunk_rows} rows")
    print(f"measured {args.dtype} matmul peak: {peak:.4f} TFLOP/s (MFU column divides by this)")
    if device.type == "cuda":
        sheet, source = data_sheet_peak(args.dtype, device)
        for v, r in results.items():
            print(f"{v}: MFU against the card's peak {sheet:.0f} TFLOP/s ({source}): {r['tflops'] / sheet:.1%}"
                  if sheet else f"{v}: no data-sheet peak ({source})")
    memory = "max allocated" if device.type == "cuda" else "RSS high-water"
    print(f"| variant | tokens/s | trained tokens/s | step s | padding | TFLOP/s | MFU | peak MiB ({memory}) "
          f"| after set-up MiB | first loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, r in results.items():
        print(f"| {v}: {VARIANTS[v]} | {r['tokens_per_s']:,.0f} | {r['trained_per_s']:,.0f} | {r['step_s']:.3f} | "
              f"{r['padding']:.1%} | {r['tflops']:.4f} | {r['mfu']:.1%} | {mib(r, 'peak_mib')} | "
              f"{mib(r, 'setup_mib')} | {r['first_loss']:.4f} |")
    for v, r in results.items():
        anchor = "AL" if v in LORA else "A"
        if v != anchor and anchor in results:
            print(f"{v}/{anchor} trained tokens/s: {r['trained_per_s'] / results[anchor]['trained_per_s']:.2f}")
    if "CL" in results and "C" in results:  # our LoRA against our full fine-tuning
        lora, full = results["CL"], results["C"]
        memory_ratio = (f", peak memory {lora['peak_mib'] / full['peak_mib']:.2f}x" if "peak_mib" in lora else "")
        print(f"CL/C: step time {lora['step_s'] / full['step_s']:.2f}x{memory_ratio}, trained parameters "
              f"{lora['trained_parameters']:,} of {full['trained_parameters']:,}")
    if args.output:
        args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "peak_tflops": peak,
                                         "machine": machine_line(device), "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(run_command("train_throughput.py", main))
