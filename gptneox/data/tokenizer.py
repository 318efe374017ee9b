"""Load a GPT-NeoX tokenizer with the Open-Assistant chat tokens, and save it for Hugging Face tools.

The reference added the chat tokens through a Python ``set``, so their ids depended on PYTHONHASHSEED
and could differ between processes. Here they are appended in one fixed order, so every process, rank
and exported model agrees on them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from gptneox.errors import MissingFileError, UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
PROMPTER_TOKEN = "<|prompter|>"
ASSISTANT_TOKEN = "<|assistant|>"
SYSTEM_TOKEN = "<|system|>"
PREFIX_BEGIN_TOKEN = "<|prefix_begin|>"
PREFIX_END_TOKEN = "<|prefix_end|>"

# Appended in exactly this order after eos and pad (which GPT-NeoX vocabularies already hold as 0 and 1).
CHAT_TOKENS = (PROMPTER_TOKEN, ASSISTANT_TOKEN, SYSTEM_TOKEN, PREFIX_BEGIN_TOKEN, PREFIX_END_TOKEN)
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN) + CHAT_TOKENS

# The chat format of gptneox.data.formatting.format_prompt as a Jinja template, so that transformers'
# apply_chat_template and pipeline("text-generation") build exactly the training string from Hugging Face
# messages ({"role": "system" | "user" | "assistant", "content": ...}).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    f"{{%- if message['role'] == 'system' -%}}{SYSTEM_TOKEN}"
    f"{{%- elif message['role'] == 'user' -%}}{PROMPTER_TOKEN}"
    f"{{%- elif message['role'] == 'assistant' -%}}{ASSISTANT_TOKEN}"
    "{%- else -%}{{ raise_exception(\"unknown role \" ~ message['role'] ~ \"; expected system, user or assistant\") }}"
    "{%- endif -%}"
    f"{{{{- message['content'] -}}}}{EOS_TOKEN}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{ASSISTANT_TOKEN}{{%- endif -%}}"
)


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be read."""


def _tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise MissingFileError(f"tokenizer file not found: {path}")
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read ``tokenizer.json`` (or a directory holding one) and make sure every special token exists.

    Tokens already present keep their ids; missing ones are appended one at a time in the order of
    ``SPECIAL_TOKENS``, so with the GPT-NeoX-20B vocabulary the chat tokens get ids 50277-50281.
    """
    file = _tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust library raises plain Exceptions with a terse message
        raise TokenizerError(f"cannot read tokenizer {file}: {error}") from error
    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None or not _is_registered_special(tokenizer, token):
            tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def added_token_ids(path: str | Path) -> list[int]:
    """The ids of the special tokens that load_tokenizer(path) appends because the file lacks them: on a
    base model's tokenizer the chat tokens, whose embedding rows the base never trained."""
    stored = Tokenizer.from_file(str(_tokenizer_file(path)))
    tokenizer = load_tokenizer(path)
    return [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS if stored.token_to_id(token) is None]


def _is_registered_special(tokenizer: Tokenizer, token: str) -> bool:
    """True when ``token`` is an added special token, so it is matched atomically and never split."""
    return any(t.content == token and t.special for t in tokenizer.get_added_tokens_decoder().values())


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path, model_max_length: int = 4096) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The two small JSON files tell ``transformers.AutoTokenizer`` which tokens play which role and how a
    chat is formatted (``CHAT_TEMPLATE``); the tokenizer itself is the ``tokenizers`` file, so no Python
    vocabulary code is needed to load it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    roles = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    special_map = {**roles, "additional_special_tokens": list(CHAT_TOKENS)}
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "additional_special_tokens": list(CHAT_TOKENS),
        "added_tokens_decoder": added,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return directory
