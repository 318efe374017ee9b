"""What a training config's data mix holds, before the run: per dataset the records read, train and eval
conversations, every drop by reason, tokens (all and trained), length percentiles, the share longer than
max_length, and steps per epoch at the config's batch sizes.

    gptneox-data-report --configs defaults stablelm-7b oasst-mix --cache_dir DATA
    gptneox-data-report --configs defaults tiny sample-mix --json

Takes train.py's arguments (the same config sections, merging and --key value overrides) and reads the data
with the same function, rules and seed, so the counts are the run's. Tokenizes with the run's tokenizer
(tokenizer_path, else the model directory's) without loading a model or starting DeepSpeed. Token figures
are over the training conversations, untruncated; "trained" counts the targets the loss covers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

from gptneox.cli.arguments import positive
from gptneox.data.datasets import LoadedDataset, load_run_datasets, merge_datasets
from gptneox.data.formatting import ConversationTokenizer
from gptneox.errors import run_command
from gptneox.training.config import parse_train_config
from gptneox.training.data_order import DataOrder
from gptneox.training.model_files import load_run_tokenizer

PERCENTILES = (50, 90, 99)


def token_counts(encode: ConversationTokenizer, conversations: list, label: str) -> tuple[list[int], int]:
    """(length of each conversation in tokens, trained targets in all of them)."""
    lengths, trained = [], 0
    for conversation in tqdm(conversations, desc=f"tokenizing {label}", unit="conv", leave=False,
                             disable=len(conversations) < 2000):
        tokens = encode(conversation)
        lengths.append(len(tokens.ids))
        trained += sum(tokens.in_reply[1:])  # target t is token t + 1
    return lengths, trained


def token_stats(lengths: list[int], trained: int, max_length: int) -> dict:
    array = np.array(lengths or [0])
    return {"tokens": int(array.sum()), "trained_tokens": trained,
            **{f"p{q}": int(np.percentile(array, q)) for q in PERCENTILES}, "max": int(array.max()),
            "longer_than_max_length": float((array > max_length).mean()) if lengths else 0.0}


def dataset_row(dataset: LoadedDataset, stats: dict) -> dict:
    return {"dataset": dataset.name, "files": [str(f) for f in dataset.files], "records": dataset.records,
            "conversations": dataset.conversations, "train": len(dataset.train), "eval": len(dataset.eval),
            "drops": dict(sorted(dataset.drops.items())), **stats}


def total_row(rows: list[dict], stats: dict) -> dict:
    drops: Counter = sum((Counter(row["drops"]) for row in rows), Counter())
    return {"dataset": "all", "files": [f for row in rows for f in row["files"]],
            **{key: sum(row[key] for row in rows) for key in ("records", "conversations", "train", "eval")},
            "drops": dict(sorted(drops.items())), **stats}


def print_table(rows: list[dict], total: dict, max_length: int) -> None:
    head = ["dataset", "records", "train", "eval", "tokens", "trained", *(f"p{q}" for q in PERCENTILES), "max",
            f">{max_length}"]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for row in rows + [total]:
        cells = [row["dataset"], row["records"], row["train"], row["eval"], row["tokens"], row["trained_tokens"],
                 *(row[f"p{q}"] for q in PERCENTILES), row["max"], f"{row['longer_than_max_length']:.1%}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()
    for row in rows:
        drops = ", ".join(f"{reason} {count}" for reason, count in row["drops"].items()) or "nothing"
        print(f"{row['dataset']}: dropped {drops}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Every other argument is train.py's (--configs, --cache_dir, --key value).")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--world_size", type=positive(int), default=1, help="GPUs of the run, for steps per epoch")
    args, train_args = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return run_command(parser.prog, lambda: report(args, train_args))


def report(args: argparse.Namespace, train_args: list[str]) -> int:
    """Read the run's data as train.py does and print the table (or JSON)."""
    cfg = parse_train_config(train_args)
    encode = ConversationTokenizer(load_run_tokenizer(cfg))
    datasets = load_run_datasets(cfg)
    train, _ = merge_datasets(datasets)
    order = DataOrder(len(train), cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                      args.world_size, 0, cfg.rng_seed)
    rows, all_lengths, all_trained = [], [], 0
    for dataset in datasets:
        lengths, trained = token_counts(encode, dataset.train, dataset.name)
        rows.append(dataset_row(dataset, token_stats(lengths, trained, cfg.max_length)))
        all_lengths += lengths
        all_trained += trained
    total = total_row(rows, token_stats(all_lengths, all_trained, cfg.max_length))
    schedule = {"max_length": cfg.max_length, "world_size": args.world_size,
                "global_batch_size": order.global_batch_size, "steps_per_epoch": order.steps_per_epoch,
                "epochs": cfg.num_train_epochs}
    if args.json:
        print(json.dumps({"datasets": rows, "total": total, "schedule": schedule}, indent=2))
        return 0
    print_table(rows, total, cfg.max_length)
    print(f"\n{len(train)} training conversations; {order.steps_per_epoch} steps per epoch of "
          f"{order.global_batch_size} ({cfg.per_device_train_batch_size} per device x "
          f"{cfg.gradient_accumulation_steps} accumulation x {args.world_size} GPU(s)), "
          f"{cfg.num_train_epochs:g} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
