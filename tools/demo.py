#!/usr/bin/env python
"""The whole pipeline on a CPU in under a minute (what `make demo` runs).

Trains the `tiny` config (a randomly initialised 2-layer GPT-NeoX) on the bundled sample mix with train.py
in one process (no launcher: this script sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a free
MASTER_PORT), evaluates it, exports a Hugging Face directory, then answers one of the model card's example
prompts with the trained model. The answer of a model this small trained this briefly is not meant to be
good; the demo shows that every stage works and that the loss falls.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gptneox.errors import run_command  # noqa: E402

PROMPT = "What is a meme, and what's the history behind this word?"  # from the seed model card


def train(output_dir: Path, epochs: int, extra: list[str]) -> None:
    from gptneox.training.distributed import single_process_environment

    command = [sys.executable, str(REPO / "train.py"), "--configs", "defaults", "tiny", "sample-mix",
               "--output_dir", str(output_dir), "--num_train_epochs", str(epochs), *extra]
    environment = {**os.environ, **single_process_environment()}
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, env=environment, check=True)


def summarize(output_dir: Path) -> None:
    from gptneox.training.metrics import eval_loss_keys, last_per_step, read_metrics
    from gptneox.training.output_dir import METRICS_FILE

    records = read_metrics(output_dir / METRICS_FILE)  # a rerun in the same directory appends
    steps = last_per_step([r for r in records if "loss" in r])
    evals = last_per_step([r for r in records if eval_loss_keys([r])])
    print(f"\ntraining loss: first step {steps[0]['loss']:.3f} -> last step {steps[-1]['loss']:.3f} "
          f"({len(steps)} steps)")
    if len(evals) >= 2:
        for key in eval_loss_keys(evals[-1:]):
            print(f"{key}: step {evals[0]['step']} {evals[0][key]:.3f} -> step {evals[-1]['step']} "
                  f"{evals[-1][key]:.3f}")


def answer(model_dir: Path, max_new_tokens: int) -> None:
    """Stream the exported model's greedy reply, loaded as tools/chat.py loads it."""
    from gptneox.chat import ChatSession, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    print(f"\n<|prompter|> {PROMPT}\n<|assistant|> ", end="", flush=True)
    ChatSession(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=False).reply(PROMPT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="out/demo", help="run directory (default out/demo)")
    parser.add_argument("--epochs", type=int, default=16, help="passes over the sample mix (default 16)")
    parser.add_argument("--max_new_tokens", type=int, default=100, help="length limit of the answer (tokens)")
    args, extra = parser.parse_known_args(argv)  # anything else goes to train.py, e.g. --learning_rate 1e-3
    output_dir = Path(args.output).resolve()
    started = time.perf_counter()
    train(output_dir, args.epochs, extra)
    summarize(output_dir)
    answer(output_dir, args.max_new_tokens)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; model in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("demo.py", main))
