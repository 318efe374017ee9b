"""gptneox: supervised fine-tuning of GPT-NeoX-family models in plain PyTorch.

The model names are imported on first use: `python -m gptneox.train` starts its launcher watch
(gptneox.training.stop) before torch is imported, seconds earlier than it otherwise could.
"""
from __future__ import annotations

import importlib

from gptneox.config import ConfigError, GPTNeoXConfig

__version__ = "0.1.0"

_HOMES = {"GPTNeoX": "model", "KVCache": "attention"}
__all__ = ["ConfigError", "GPTNeoX", "GPTNeoXConfig", "KVCache", "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'gptneox' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gptneox.{_HOMES[name]}"), name)
