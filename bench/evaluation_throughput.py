#!/usr/bin/env python
"""Time of one evaluation (gptneox.training.evaluation.Evaluator.run), padded against packed batches, on the
same conversations and model: what `pack` buys evaluation. Conversations of real chat lengths
(bench/train_throughput.py's chat_profile), Pythia-70M shape, fp32, one process, the two layouts in turn.

    python bench/evaluation_throughput.py                  # 48 conversations, batch 8, max_length 1024
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402
from gptneox.data import build_datasets, load_tokenizer  # noqa: E402
from gptneox.errors import run_command  # noqa: E402
from gptneox.training.config import repo_path  # noqa: E402
from gptneox.training.evaluation import Evaluator  # noqa: E402
from gptneox.training.stop import StopRequest  # noqa: E402

import train_throughput  # noqa: E402  (bench/ is the script's own folder)


class PlainEngine:
    """What an evaluation uses of a DeepSpeed engine, over a plain module."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.eval()

    def train(self, mode: bool = True):
        self.module.train(mode)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=48)
    parser.add_argument("--batch_size", type=int, default=8, help="per_device_eval_batch_size")
    parser.add_argument("--max_length", type=int, default=1024, help="eval_max_length")
    parser.add_argument("--rounds", type=int, default=2, help="evaluations per layout, alternating")
    args = parser.parse_args(argv)

    mix = train_throughput.SAMPLE_MIX
    sample, _ = build_datasets(mix["datasets"], cache_dir=repo_path(mix["cache_dir"]), seed=0)
    conversations = train_throughput.chat_profile(sample, args.conversations, seed=1)
    tokenizer = load_tokenizer(repo_path(mix["tokenizer_path"]))
    torch.manual_seed(0)
    engine = PlainEngine(GPTNeoX(GPTNeoXConfig.from_name("pythia-70m")))
    evaluators = {pack: Evaluator({"chat": conversations}, tokenizer, max_length=args.max_length,
                                  batch_size=args.batch_size, every=1, rank=0, world=1, pack=pack)
                  for pack in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    stop = StopRequest()
    try:
        for _ in range(args.rounds):
            for pack, evaluator in evaluators.items():
                start = time.perf_counter()
                figures = evaluator.run(engine, stop)
                times[pack].append(time.perf_counter() - start)
                print(f"{'packed' if pack else 'padded'}: {times[pack][-1]:.2f} s, loss {figures['eval_chat_loss']:.9f}")
    finally:
        stop.restore()
    padded, packed = min(times[False]), min(times[True])
    print(f"{args.conversations} conversations, batch {args.batch_size}, max_length {args.max_length}, "
          f"{torch.get_num_threads()} threads: padded {padded:.2f} s, packed {packed:.2f} s (best of "
          f"{args.rounds}): {padded / packed:.2f}x")


if __name__ == "__main__":
    sys.exit(run_command("evaluation_throughput.py", main))
