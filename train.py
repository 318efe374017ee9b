#!/usr/bin/env python
"""Supervised fine-tuning of a GPT-NeoX model with an explicit DeepSpeed ZeRO-2 loop (the SFT-7 recipe).

    deepspeed train.py --configs defaults stablelm-7b oasst-mix --cache_dir DATA --output_dir OUT --deepspeed
    python train.py --configs defaults tiny sample-mix          # one process, no launcher

The command is gptneox/train.py (also `python -m gptneox.train`); the loop is gptneox/training/loop.py.
"""
import sys

from gptneox.train import main

if __name__ == "__main__":
    sys.exit(main())
