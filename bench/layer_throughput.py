#!/usr/bin/env python
"""Forward+backward of ONE transformer layer: gptneox.model.Block against transformers' GPTNeoXLayer, at a
full-size model's layer shape (default StableLM-base-alpha-7B: hidden 6144, 48 heads of 128, rotary on 32 dims
of each, MLP 24576, parallel residual), fp32, a short sequence so that it runs in seconds on a CPU.

Equal work and equal weights: the transformers layer is given the very Parameters of ours (Hugging Face names
and layouts are the same), both use SDPA with a causal mask, rotary angles for positions 0..T-1; the script
checks that outputs and all gradients (weights and input) agree before timing. One step = zero the gradients,
forward, backward from the same output gradient (the input's gradient included, as inside a stack). Steps
alternate between the two layers; best and median are reported (load only ever adds time).
--profile prints torch.profiler's operator table of one step of each, forward and backward.

    python bench/layer_throughput.py                              # StableLM-7B layer, 1 x 256, fp32
    python bench/layer_throughput.py --profile --iters 3
    python bench/layer_throughput.py --preset pythia-70m --batch_size 4 --seq_len 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox import GPTNeoXConfig  # noqa: E402
from gptneox.attention import AttentionMask  # noqa: E402
from gptneox.errors import run_command  # noqa: E402
from gptneox.model import Block, rotary_cos_sin  # noqa: E402


def layers(config: GPTNeoXConfig, seed: int):
    """(ours, theirs as a function of x): the same Parameters in both."""
    import transformers
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer, GPTNeoXRotaryEmbedding

    torch.manual_seed(seed)
    ours = Block(config, 0).train()
    for parameter in ours.parameters():  # the model's initialisation: N(0, initializer_range), LN at 1 and 0
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=config.initializer_range)
    hf_config = transformers.GPTNeoXConfig(**config.to_hf())
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        theirs = GPTNeoXLayer(hf_config, 0)
    for name, parameter in ours.named_parameters():  # their parameters are ours, so are the gradients
        module, _, leaf = name.rpartition(".")
        theirs.get_submodule(module)._parameters[leaf] = parameter
    theirs.train()
    assert dict(theirs.named_parameters()).keys() == dict(ours.named_parameters()).keys()
    return ours, theirs, GPTNeoXRotaryEmbedding(hf_config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="stablelm-base-alpha-7b", help="layer shape (GPTNeoXConfig.from_name)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--profile", action="store_true", help="also print a profile of one step of each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import transformers
    torch.set_num_threads(args.threads)
    config = GPTNeoXConfig.from_name(args.preset)
    ours, theirs, hf_rotary = layers(config, args.seed)
    B, T = args.batch_size, args.seq_len
    x = torch.randn(B, T, config.hidden_size)
    grad_out = torch.randn(B, T, config.hidden_size)
    positions = torch.arange(T).expand(B, T)
    rope = rotary_cos_sin(positions, config, x.dtype)
    mask = AttentionMask(B, T, T)
    hf_rope = hf_rotary(x, positions)
    run = {"gptneox Block": lambda x: ours(x, rope, mask, "sdpa"),
           "transformers GPTNeoXLayer": lambda x: theirs(x, position_embeddings=hf_rope)}

    def step(name):
        ours.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        start = time.perf_counter()
        out = run[name](inputs)
        out.backward(grad_out)
        seconds = time.perf_counter() - start
        return seconds, out.detach(), [inputs.grad] + [p.grad for p in ours.parameters()]

    print(f"{args.preset} layer (hidden {config.hidden_size}, {config.num_attention_heads} heads, rotary "
          f"{config.rotary_ndims} of {config.head_dim} dims, MLP {config.intermediate_size}), batch {B} x {T}, "
          f"fp32, {args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    (_, out_a, grads_a), (_, out_b, grads_b) = (step(name) for name in run)
    grad_error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads_a, grads_b))
    print(f"  same work: largest output difference {float((out_a - out_b).abs().max()):.2e}, largest gradient "
          f"difference {grad_error:.2e} of the gradient's largest entry")
    for _ in range(args.warmup):
        for name in run:
            step(name)
    times = {name: [] for name in run}
    for _ in range(args.iters):
        for name in run:
            times[name].append(step(name)[0])
    for name, t in times.items():
        print(f"  forward+backward {name:26s} best {min(t) * 1000:8.1f} ms, median {statistics.median(t) * 1000:8.1f} ms")
    reference, ours_name = "transformers GPTNeoXLayer", "gptneox Block"
    for label, pick in (("best", min), ("median", statistics.median)):
        print(f"  speed ratio gptneox / transformers ({label}): {pick(times[reference]) / pick(times[ours_name]):.3f}")
    if args.profile:
        from torch.profiler import profile
        for name in run:
            with profile() as prof:
                step(name)
            print(f"\nprofile of one step, {name}:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    sys.exit(run_command("layer_throughput.py", main))
