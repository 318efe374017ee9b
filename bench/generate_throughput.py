#!/usr/bin/env python
"""Greedy decoding speed of gptneox's KV-cache generate() next to transformers' generate(), same weights.

A random model of a preset's shape is built with transformers, saved, and loaded by GPTNeoX.from_pretrained,
so both decode the same weights; the script checks that they produce the same tokens. Batches larger than
one use left-padded prompts of different lengths. tokens/s counts new tokens of all rows; each figure is the
median of --repeats runs after one warm-up run, the two
implementations timed alternately.

    python bench/generate_throughput.py --preset pythia-70m --batch_sizes 1 4 --new_tokens 128
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402
from gptneox.generate import generate, left_pad  # noqa: E402
from gptneox.errors import run_command  # noqa: E402

PAD_ID = 1


def build_models(preset: str, directory: str):
    try:
        import transformers
    except ImportError:
        sys.exit("generate_throughput.py: error: this benchmark compares against transformers; "
                 "pip install the test extras")
    ours = GPTNeoXConfig.from_name(preset)
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=ours.vocab_size, hidden_size=ours.hidden_size, num_hidden_layers=ours.num_hidden_layers,
        num_attention_heads=ours.num_attention_heads, intermediate_size=ours.intermediate_size,
        max_position_embeddings=ours.max_position_embeddings, rotary_pct=ours.rotary_pct,
        rotary_emb_base=ours.rotary_emb_base, use_parallel_residual=ours.use_parallel_residual,
        tie_word_embeddings=ours.tie_word_embeddings, eos_token_id=0, bos_token_id=0, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(hf_config).eval()
    hf.save_pretrained(directory)
    return transformers, hf, GPTNeoX.from_pretrained(directory).eval()


def timed_pair(first, second, repeats: int) -> tuple[torch.Tensor, float, torch.Tensor, float]:
    """Median seconds of two runs, timed alternately so that a change in machine load hits both alike."""
    outputs = [first(), second()]  # warm-up: first-call allocations and kernel selection
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for index, run in enumerate((first, second)):
            start = time.perf_counter()
            outputs[index] = run()
            times[index].append(time.perf_counter() - start)
    return outputs[0], statistics.median(times[0]), outputs[1], statistics.median(times[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pythia-70m", help="model shape (GPTNeoXConfig preset; default pythia-70m)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4], help="default: 1 4")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row (default 128)")
    parser.add_argument("--prompt_length", type=int, default=32, help="longest prompt in tokens (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default 3)")
    parser.add_argument("--attention_backend", default="sdpa", help="our backend: sdpa or eager (default sdpa)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as directory:
        transformers, hf, ours = build_models(args.preset, directory)
    ours.attention_backend = args.attention_backend
    never_stop = transformers.GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=False, num_beams=1, eos_token_id=0, pad_token_id=PAD_ID)
    print(f"{args.preset}, fp32, {torch.get_num_threads()} threads, greedy, {args.new_tokens} new tokens, "
          f"prompts up to {args.prompt_length} tokens, median of {args.repeats}")
    print("| batch | gptneox tokens/s | transformers tokens/s | ratio | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    generator = torch.Generator().manual_seed(1)
    for batch in args.batch_sizes:
        lengths = [max(1, args.prompt_length - 4 * row) for row in range(batch)]
        prompts = [torch.randint(2, ours.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
        input_ids, mask = left_pad(prompts, PAD_ID)

        # transformers' min_new_tokens masks eos; ours simply has no stop id: both run the full length
        def ours_run():
            return generate(ours, input_ids, mask, max_new_tokens=args.new_tokens, stop_token_ids=())

        def hf_run():
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")
                return hf.generate(input_ids, attention_mask=mask, generation_config=never_stop)

        ours_out, ours_s, hf_out, hf_s = timed_pair(ours_run, hf_run, args.repeats)
        tokens = batch * args.new_tokens
        same = ours_out.shape == hf_out.shape and bool((ours_out == hf_out).all())
        print(f"| {batch} | {tokens / ours_s:.1f} | {tokens / hf_s:.1f} | {hf_s / ours_s:.2f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    sys.exit(run_command("generate_throughput.py", main))
