"""Train a small GPT-NeoX style byte-level BPE tokenizer on the conversations of a datasets config.

The result mirrors the GPT-NeoX-20B tokenizer's pipeline (NFC normalizer, byte-level pre-tokenizer
without prefix space, byte-level decoder) with <|endoftext|> = 0 and <|padding|> = 1. The chat tokens
are not part of the file: gptneox.data.load_tokenizer appends them, exactly as it does for the real
tokenizer. Used to build data/sample/tokenizer.json for the tests and the demo:

    python tools/train_tokenizer.py --configs sample-mix --output data/sample/tokenizer.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from gptneox.data.datasets import parse_entry, read_dataset
from gptneox.data.tokenizer import EOS_TOKEN, PAD_TOKEN
from gptneox.training.config import load_section, repo_path
from gptneox.errors import run_command


def conversation_texts(section: str) -> list[str]:
    """Every message text of every dataset of the config ``section`` (train and validation alike)."""
    settings = load_section(section)
    cache_dir = repo_path(settings.get("cache_dir", "."))
    texts = []
    for entry in settings["datasets"]:
        name, options = parse_entry(entry)
        for unit in read_dataset(name, options, cache_dir).units:
            texts.extend(message["text"] for conversation in unit for message in conversation)
    return texts


def train(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids 0 and 1, as in GPT-NeoX
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sample-mix",
                        help="config section with the datasets (a name in configs/ or a YAML path)")
    parser.add_argument("--vocab_size", type=int, default=1536)
    parser.add_argument("--output", type=Path, default=repo_path("data/sample/tokenizer.json"))
    args = parser.parse_args()
    texts = conversation_texts(args.configs)
    tokenizer = train(texts, args.vocab_size)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.output))
    print(f"trained on {len(texts)} messages; vocab {tokenizer.get_vocab_size()} -> {args.output}")


if __name__ == "__main__":
    sys.exit(run_command("train_tokenizer.py", main))
