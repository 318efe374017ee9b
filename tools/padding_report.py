"""Padding fraction of the DialogueCollator's padded and packed modes on a training config's data.

Padding fraction = padding tokens / all tokens of the batch tensors (what the model computes on for
nothing). The training conversations, in the run's first-epoch order, are cut into batches of --batch_size;
packed mode lays each batch's conversations end to end in one row, as training does. Windows are off
(evaluation-style truncation) so the figures are exactly reproducible.

    python tools/padding_report.py --configs defaults tiny sample-mix --max_length 256 512 --batch_size 8

Every other argument is train.py's (--configs, default `defaults tiny sample-mix`; --cache_dir; --key value):
the data is read with the same function, rules and seed as the run, and tokenized with its tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox.data import DialogueCollator  # noqa: E402
from gptneox.data.datasets import load_run_datasets, merge_datasets  # noqa: E402
from gptneox.errors import run_command  # noqa: E402
from gptneox.training.config import parse_train_config  # noqa: E402
from gptneox.training.data_order import DataOrder  # noqa: E402
from gptneox.training.model_files import load_run_tokenizer  # noqa: E402

DEFAULT_CONFIGS = ["--configs", "defaults", "tiny", "sample-mix"]


def padding_fraction(collate: DialogueCollator, conversations: list, batch_size: int) -> tuple[float, int]:
    """(padding tokens / all tokens, number of rows) over all batches."""
    padding = total = rows = 0
    for start in range(0, len(conversations), batch_size):
        batch = collate(conversations[start : start + batch_size])
        mask = batch["attention_mask"]
        padding += int((mask == 0).sum())
        total += mask.numel()
        rows += mask.shape[0]
    return padding / total, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_length", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8])
    args, train_args = parser.parse_known_args(argv)
    if "--configs" not in train_args:
        train_args = DEFAULT_CONFIGS + train_args
    cfg = parse_train_config(train_args)
    tokenizer = load_run_tokenizer(cfg)
    train, _ = merge_datasets(load_run_datasets(cfg))
    # the run's first-epoch order (the permutation depends only on the sample count, the seed and the epoch)
    order = DataOrder(num_samples=len(train), micro_batch_size=1, gradient_accumulation_steps=1, world_size=1,
                      rank=0, seed=cfg.rng_seed).permutation(0)
    train = [train[i] for i in order]
    print(f"{len(train)} training conversations of {' '.join(train_args)}, "
          f"pad_to_multiple_of {cfg.pad_to_multiple_of}\n")
    print("| max_length | batch size | padded: padding | padded: rows | packed: padding | packed: rows |")
    print("|---:|---:|---:|---:|---:|---:|")
    for max_length in args.max_length:
        for batch_size in args.batch_size:
            results = []
            for pack in (False, True):
                collate = DialogueCollator(tokenizer, max_length=max_length, random_offset_probability=0.0,
                                           pad_to_multiple_of=cfg.pad_to_multiple_of, pack=pack, seed=cfg.rng_seed)
                results.append(padding_fraction(collate, train, batch_size))
            (padded, padded_rows), (packed, packed_rows) = results
            print(f"| {max_length} | {batch_size} | {padded:.1%} | {padded_rows} | {packed:.1%} | {packed_rows} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("padding_report.py", main))
