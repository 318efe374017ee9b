"""Data pipeline: local dataset files -> conversations -> chat-formatted tokens -> masked training batches."""

from gptneox.data.collator import DialogueCollator
from gptneox.data.datasets import build_datasets
from gptneox.data.formatting import ConversationError, format_prompt, normalize_conversation
from gptneox.data.readers import DataError
from gptneox.data.tokenizer import CHAT_TOKENS, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, load_tokenizer, save_tokenizer

__all__ = [
    "CHAT_TOKENS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "ConversationError",
    "DataError",
    "DialogueCollator",
    "build_datasets",
    "format_prompt",
    "load_tokenizer",
    "normalize_conversation",
    "save_tokenizer",
]
