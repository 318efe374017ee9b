"""gptneox: supervised fine-tuning of GPT-NeoX-family models in plain PyTorch."""

from gptneox.attention import KVCache
from gptneox.config import ConfigError, GPTNeoXConfig
from gptneox.model import GPTNeoX

__all__ = ["ConfigError", "GPTNeoX", "GPTNeoXConfig", "KVCache"]
