"""Export a train.py checkpoint directory (OUTPUT_DIR/checkpoints) to a Hugging Face model directory.

The weights are the fp32 master copy gathered from the ZeRO partitions, written in the training dtype
(or --dtype); config.json and the tokenizer files come from the checkpoint directory. The result loads
with GPTNeoX.from_pretrained and transformers.GPTNeoXForCausalLM.from_pretrained. A LoRA run's checkpoint
is exported both ways: the adapters merged into its base model (read from the base's directory), and the
adapter alone in peft's format in OUTPUT_DIR/adapter.
"""
from __future__ import annotations

import argparse
import sys

from gptneox.dtypes import DTYPE_HELP, TORCH_DTYPES, dtype_name
from gptneox.errors import UserError, report_user_error
from gptneox.training.export import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", help="OUTPUT_DIR/checkpoints of a train.py run")
    parser.add_argument("output_dir", help="where to write config.json, *.safetensors and tokenizer files")
    parser.add_argument("--tag", help="checkpoint tag, e.g. step00000500 (default: the newest complete one)")
    parser.add_argument("--dtype", type=dtype_name, choices=list(TORCH_DTYPES), metavar="DTYPE",
                        help=f"weight dtype: {DTYPE_HELP} (default: the training dtype)")
    parser.add_argument("--max_shard_size", default="2GB", help="safetensors shard size (default 2GB)")
    parser.add_argument("--trust_checkpoint_code", action="store_true",
                        help="load the checkpoint's .pt files unchecked: code in them runs (only for checkpoints "
                             "you trust; by default anything but tensors and DeepSpeed's own types is refused)")
    parser.add_argument("--base_model", metavar="DIR",
                        help="a LoRA checkpoint's base model where it is now, if it has moved since training "
                             "(default: the directory training read it from)")
    parser.add_argument("--allow_other_base", action="store_true",
                        help="merge a LoRA checkpoint's adapters into a base whose weights are not those they "
                             "were trained on (by default refused)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint_dir, args.output_dir, tag=args.tag, dtype=args.dtype,
                                 max_shard_size=args.max_shard_size,
                                 trust_checkpoint_code=args.trust_checkpoint_code, base_model=args.base_model,
                                 allow_other_base=args.allow_other_base)
    except UserError as err:
        return report_user_error(parser.prog, err)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
