"""Convert a Hugging Face GPT-NeoX checkpoint in any supported layout to (sharded) safetensors.

Reads model.safetensors, pytorch_model.bin or their sharded index forms, writes config.json plus
safetensors shards, and copies the tokenizer files and generation_config.json along. Without --dtype every tensor is written in the dtype of the stored embed_in
weight: bit-exact for the usual one-dtype checkpoint, while a mixed-dtype one is cast to that dtype.

    gptneox-convert path/to/stablelm-base-alpha-7b out/stablelm-7b --max_shard_size 2GB
"""
import argparse
import shutil
import sys
from pathlib import Path

from gptneox import GPTNeoX
from gptneox.errors import UserError, report_user_error

# Copied along unchanged when the source has them: the tokenizer and the generation settings.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Hugging Face model directory (config.json + weights)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--dtype", default="auto",
                        help="fp32, fp16, bf16 (or float32, float16, bfloat16), or auto (the stored embed_in "
                             "dtype; default)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest shard, e.g. 2GB or 500MiB (default 2GB)")
    args = parser.parse_args(argv)
    if Path(args.src).resolve() == Path(args.dst).resolve():
        parser.error("src and dst must be different directories")
    try:
        model = GPTNeoX.from_pretrained(args.src, dtype=args.dtype)
        model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
        copied = [name for name in COMPANION_FILES if (Path(args.src) / name).is_file()]
        for name in copied:
            shutil.copyfile(Path(args.src) / name, Path(args.dst) / name)
    except UserError as err:  # missing files, CheckpointError, ConfigError, a bad size or dtype
        return report_user_error(parser.prog, err)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: {count:,} parameters in {next(model.parameters()).dtype}"
          + (f"; copied {', '.join(copied)}" if copied else "; the source has no tokenizer files"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
