"""The Open-Assistant chat format, and tokenization that knows the role of every token.

Text of a conversation (no separators between pieces)::

    [<|system|>{system}<|endoftext|>] <|prompter|>{q1}<|endoftext|><|assistant|>{a1}<|endoftext|> ...

A generation prompt ends with a bare ``<|assistant|>``.

Each piece (role token, message text, eos) is tokenized on its own. Special tokens are atomic, so this
gives exactly the ids of tokenizing the whole string, while the role of every token is known without
guessing from offsets. Text that itself contains a special-token string (``<|endoftext|>`` in a code
sample, say) is encoded as the tokenizer encodes it, as that special token, but such a token is never
trained: a reply must not teach the model to emit role or end tokens in the middle of its text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tokenizers import Tokenizer

from gptneox.data.tokenizer import ASSISTANT_TOKEN, EOS_TOKEN, PROMPTER_TOKEN, SPECIAL_TOKENS, SYSTEM_TOKEN
from gptneox.errors import UserError

ROLES = ("prompter", "assistant", "system")
ROLE_TOKENS = {"prompter": PROMPTER_TOKEN, "assistant": ASSISTANT_TOKEN, "system": SYSTEM_TOKEN}

Conversation = list[dict[str, str]]


class ConversationError(UserError, ValueError):
    """A conversation that does not follow the chat format; the message names what is wrong."""


def normalize_conversation(sample: Any) -> Conversation:
    """Return ``sample`` as a list of ``{"role", "text"}`` dicts, or raise ConversationError.

    Accepted: a list of such dicts (an optional system message first, then prompter and assistant
    strictly alternating, starting with the prompter), or a plain list of alternating strings that
    starts with the prompter (the reference's dataset format).
    """
    if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
        raise ConversationError(f"expected a list of messages, got {type(sample).__name__}")
    if not sample:
        raise ConversationError("conversation is empty")
    if all(isinstance(item, str) for item in sample):
        return [{"role": ("prompter", "assistant")[i % 2], "text": text} for i, text in enumerate(sample)]
    conversation = []
    for index, message in enumerate(sample):
        if not isinstance(message, dict):
            raise ConversationError(f"message {index} is a {type(message).__name__}, expected a dict")
        missing = [key for key in ("role", "text") if key not in message]
        if missing:
            raise ConversationError(f"message {index} has no {' and no '.join(repr(k) for k in missing)}")
        role, text = message["role"], message["text"]
        if role not in ROLES:
            raise ConversationError(f"message {index} has unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(text, str):
            raise ConversationError(f"message {index} text is a {type(text).__name__}, expected str")
        conversation.append({"role": role, "text": text})
    _check_turn_order(conversation)
    return conversation


def _check_turn_order(conversation: Conversation) -> None:
    turns = conversation[1:] if conversation[0]["role"] == "system" else conversation
    for index, message in enumerate(turns):
        expected = ("prompter", "assistant")[index % 2]
        if message["role"] != expected:
            position = index + len(conversation) - len(turns)
            raise ConversationError(
                f"message {position} has role {message['role']!r} where {expected!r} is expected "
                "(an optional system message first, then prompter and assistant alternating)"
            )


def format_prompt(conversation: Any) -> str:
    """Training text of a conversation; a trailing ``<|assistant|>`` when it ends on the prompter.

    Generation therefore only needs ``format_prompt(history + [{"role": "prompter", "text": q}])``.
    """
    conversation = normalize_conversation(conversation)
    text = "".join(ROLE_TOKENS[m["role"]] + m["text"] + EOS_TOKEN for m in conversation)
    if conversation[-1]["role"] != "assistant":
        text += ASSISTANT_TOKEN
    return text


@dataclass
class TokenizedConversation:
    """Token ids of a formatted conversation and, per token, whether it belongs to an assistant reply.

    ``in_reply[i]`` is True for the text tokens of assistant messages and for each reply's closing
    eos; never for role tokens, prompter or system text, nor special tokens written inside a text.
    """

    ids: list[int]
    in_reply: list[bool]


class ConversationTokenizer:
    """Turns conversations into ids + reply flags, caching the ids of the role and eos tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.role_ids = {role: self._special_id(token) for role, token in ROLE_TOKENS.items()}
        self.eos_id = self._special_id(EOS_TOKEN)
        self.special_ids = {self.tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token}; load it with gptneox.data.load_tokenizer")
        return token_id

    def __call__(self, conversation: Conversation) -> TokenizedConversation:
        """Tokenize an already normalized conversation (see ``normalize_conversation``)."""
        texts = self.tokenizer.encode_batch([m["text"] for m in conversation], add_special_tokens=False)
        ids: list[int] = []
        in_reply: list[bool] = []
        for message, encoding in zip(conversation, texts):
            is_reply = message["role"] == "assistant"
            ids.append(self.role_ids[message["role"]])
            in_reply.append(False)
            ids.extend(encoding.ids)
            in_reply.extend(is_reply and token not in self.special_ids for token in encoding.ids)
            ids.append(self.eos_id)
            in_reply.append(is_reply)
        return TokenizedConversation(ids, in_reply)
