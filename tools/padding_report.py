"""Padding fraction of the DialogueCollator's padded and packed modes on a datasets config.

Padding fraction = padding tokens / all tokens of the batch tensors (what the model computes on for
nothing). Conversations are shuffled with --seed and cut into batches of --batch_size; packed mode
lays each batch's conversations end to end in the row layout with the fewest cells, as training does.
Windows are off (evaluation-style truncation) so the figures are exactly reproducible. Relative paths in
the config section (cache_dir, tokenizer_path) are taken from the repository root: it runs from anywhere.

    python tools/padding_report.py --configs sample-mix --max_length 256 512 --batch_size 8
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptneox.data import DialogueCollator, build_datasets, load_tokenizer  # noqa: E402
from gptneox.training.config import load_section, repo_path  # noqa: E402
from gptneox.errors import run_command  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sample-mix",
                        help="config section (a name in configs/ or a YAML path) holding datasets and cache_dir")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the section's tokenizer_path")
    parser.add_argument("--max_length", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8])
    parser.add_argument("--pad_to_multiple_of", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    settings = load_section(args.configs)
    tokenizer = load_tokenizer(args.tokenizer or repo_path(settings["tokenizer_path"]))
    train, _ = build_datasets(settings["datasets"], cache_dir=repo_path(settings.get("cache_dir", ".")),
                              seed=args.seed)
    random.Random(args.seed).shuffle(train)
    print(f"{len(train)} training conversations of {args.configs}, pad_to_multiple_of {args.pad_to_multiple_of}\n")
    print("| max_length | batch size | padded: padding | padded: rows | packed: padding | packed: rows |")
    print("|---:|---:|---:|---:|---:|---:|")
    for max_length in args.max_length:
        for batch_size in args.batch_size:
            results = []
            for pack in (False, True):
                collate = DialogueCollator(tokenizer, max_length=max_length, random_offset_probability=0.0,
                                           pad_to_multiple_of=args.pad_to_multiple_of, pack=pack, seed=args.seed)
                results.append(padding_fraction(collate, train, batch_size))
            (padded, padded_rows), (packed, packed_rows) = results
            print(f"| {max_length} | {batch_size} | {padded:.1%} | {padded_rows} | {packed:.1%} | {packed_rows} |")


if __name__ == "__main__":
    sys.exit(run_command("padding_report.py", main))
