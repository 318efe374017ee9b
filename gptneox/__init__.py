"""gptneox: supervised fine-tuning of GPT-NeoX-family models in plain PyTorch."""

from gptneox.attention import KVCache
from gptneox.config import ConfigError, GPTNeoXConfig
from gptneox.model import GPTNeoX

__version__ = "0.1.0"

__all__ = ["ConfigError", "GPTNeoX", "GPTNeoXConfig", "KVCache", "__version__"]
