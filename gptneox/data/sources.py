"""Dataset sources: how each named dataset's records become conversations.

The conversion rules follow the Open-Assistant ``stable_lm_training`` branch (the code that trained
StableLM SFT-7). Each converter returns the conversations of one *unit*: a whole message tree for
``oasst_export`` (so that the train/validation split keeps every tree on one side), one record for
the others. A bad record raises ``RecordError`` naming the field; the caller adds file and line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from gptneox.data.formatting import Conversation
from gptneox.errors import UserError

MAX_MESSAGE_CHARS = 2048  # the reference cut vicuna and dolly messages to this many characters
CODE_ALPACA_BANNED_WORDS = ("openai",)  # the reference's FILTER_BY_WORDS at the time of SFT-7


class RecordError(UserError, ValueError):
    """A record that does not match its dataset's schema (reported as a DataError naming the file and place)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r}: {problem}")


def _get(record: Any, field: str, kind: type = str, path: str | None = None, default: Any = ...) -> Any:
    """``record[field]`` checked to be of ``kind``; ``default`` (if given) when absent or null."""
    name = path or field
    if not isinstance(record, dict):
        raise RecordError(name, f"cannot be read: its container is a {type(record).__name__}, not an object")
    value = record.get(field)
    if value is None:
        if default is not ...:
            return default
        raise RecordError(name, "missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(name, f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _pair(question: str, answer: str) -> list[Conversation]:
    return [[{"role": "prompter", "text": question}, {"role": "assistant", "text": answer}]]


# --- oasst_export: message trees ------------------------------------------------------------------


def oasst_export(record: Any, lang: str | list[str] = "en", top_k: int | None = None) -> list[Conversation]:
    """Every root-to-leaf thread of a reviewed, exportable tree in an accepted language.

    A thread ends on an assistant leaf, or on a prompter leaf that is its parent's first reply (that
    prompter turn is then dropped). Threads through deleted or synthetic messages are skipped; with
    ``top_k``, so are threads through an assistant ranked ``>= top_k`` or unranked among siblings.
    """
    languages = set(lang.split(",") if isinstance(lang, str) else lang)
    if _get(record, "tree_state") != "ready_for_export":
        return []
    root = _get(record, "prompt", dict)
    if not root.get("review_result") or _get(root, "lang", path="prompt.lang") not in languages:
        return []
    threads: list[Conversation] = []
    _visit(root, "prompt", [], None, threads, top_k)
    return threads


def _visit(node: dict, where: str, path: list[dict], parent: dict | None, out: list, top_k: int | None) -> None:
    role = _get(node, "role", path=f"{where}.role")
    expected = "prompter" if parent is None or parent["role"] == "assistant" else "assistant"
    if role not in ("prompter", "assistant"):
        raise RecordError(f"{where}.role", f"unknown role {role!r}; expected 'prompter' or 'assistant'")
    if role != expected:
        raise RecordError(f"{where}.role", f"{role!r} follows a {'nothing' if parent is None else parent['role']!r}")
    _get(node, "text", path=f"{where}.text")
    _get(node, "rank", int, path=f"{where}.rank", default=None)  # _thread_allowed compares it
    replies = _get(node, "replies", list, path=f"{where}.replies", default=[])
    path = path + [node]
    if not replies and len(path) > 1:
        ends_on_first_prompter = role == "prompter" and parent["replies"][0] is node
        if (role == "assistant" or ends_on_first_prompter) and _thread_allowed(path, top_k):
            kept = path if role == "assistant" else path[:-1]
            out.append([{"role": n["role"], "text": n["text"]} for n in kept])
    for index, child in enumerate(replies):
        _visit(child, f"{where}.replies[{index}]", path, node, out, top_k)


def _thread_allowed(path: list[dict], top_k: int | None) -> bool:
    if any(node.get("deleted") or node.get("synthetic") for node in path):
        return False
    if top_k is None:
        return True
    for parent, node in zip(path, path[1:]):
        if node["role"] != "assistant":
            continue
        rank = node.get("rank")
        if (rank is None and len(parent["replies"]) > 1) or (rank is not None and rank >= top_k):
            return False
    return True


# --- single-pair and chat sources -----------------------------------------------------------------


def vicuna(record: Any) -> list[Conversation]:
    """ShareGPT ``conversations`` of ``{from: human|gpt, value}``; consecutive turns of one speaker join."""
    turns = _get(record, "conversations", list)
    messages: Conversation = []
    for index, turn in enumerate(turns):
        speaker = _get(turn, "from", path=f"conversations[{index}].from")
        value = _get(turn, "value", path=f"conversations[{index}].value")
        if speaker not in ("human", "gpt"):
            raise RecordError(f"conversations[{index}].from", f"unknown speaker {speaker!r}; expected 'human' or 'gpt'")
        role = "prompter" if speaker == "human" else "assistant"
        text = value.replace("\\_", "_").replace("\\*", "*")  # undo the dump's markdown escaping
        if messages and messages[-1]["role"] == role:
            messages[-1]["text"] += "\n" + text
        else:
            messages.append({"role": role, "text": text})
    if not messages or messages[0]["role"] != "prompter":
        return []
    if messages[-1]["role"] == "prompter":  # a trailing question has nothing to train
        messages.pop()
    if not messages:
        return []
    return [[{"role": m["role"], "text": m["text"][:MAX_MESSAGE_CHARS]} for m in messages]]


_NUMBERED_REFERENCE = re.compile(r"\[\d+(?:\s*[,–-]\s*\d+)*\]")
_LETTER_REFERENCE = re.compile(r"\[[a-z]\]")


def _clean_context(context: str) -> str:
    """Remove Wikipedia reference marks: ``[12]``, ``[3, 4]``, ``[citation needed]``, ``[a]``."""
    context = _NUMBERED_REFERENCE.sub("", context).replace("[citation needed]", "")
    return _LETTER_REFERENCE.sub("", context).strip()


def dolly15k(record: Any) -> list[Conversation]:
    """Dolly 15k, OA schema (``INSTRUCTION/RESPONSE/METADATA.CONTEXT``) or the original lower-case one.

    A non-empty context is placed before the instruction: ``"{context} {instruction}"``.
    """
    if isinstance(record, dict) and "INSTRUCTION" in record:
        instruction = _get(record, "INSTRUCTION")
        response = _get(record, "RESPONSE")
        context = _oa_dolly_context(record)
    elif isinstance(record, dict) and "instruction" in record:
        instruction = _get(record, "instruction")
        response = _get(record, "response")
        context = _get(record, "context", default="")
    else:
        raise RecordError("INSTRUCTION", "missing (neither the INSTRUCTION nor the instruction schema)")
    context = _clean_context(context)
    prompt = f"{context} {instruction}" if context else instruction
    return _pair(prompt[:MAX_MESSAGE_CHARS], response[:MAX_MESSAGE_CHARS])


def _oa_dolly_context(record: dict) -> str:
    """``METADATA.CONTEXT``: a nested object (json, parquet), a JSON string, or a flat csv column."""
    if "METADATA.CONTEXT" in record:
        return _get(record, "METADATA.CONTEXT", default="")
    metadata = record.get("METADATA")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata.strip() else {}
        except json.JSONDecodeError:
            raise RecordError("METADATA", "a string that is not a JSON object") from None
    if metadata is None:
        return ""
    return _get(metadata, "CONTEXT", path="METADATA.CONTEXT", default="")


def grade_school_math_instructions(record: Any) -> list[Conversation]:
    """``INSTRUCTION`` -> ``RESPONSE``."""
    return _pair(_get(record, "INSTRUCTION"), _get(record, "RESPONSE"))


def code_alpaca(record: Any) -> list[Conversation]:
    """``instruction`` (+ ``"\\n" + input`` when given) -> ``output``; pairs mentioning OpenAI are dropped."""
    instruction = _get(record, "instruction")
    extra = _get(record, "input", default="")
    output = _get(record, "output")
    prompt = f"{instruction}\n{extra}" if extra else instruction
    if any(word in text.lower() for text in (prompt, output) for word in CODE_ALPACA_BANNED_WORDS):
        return []
    return _pair(prompt, output)


@dataclass(frozen=True)
class Source:
    """A named dataset: its converter, its own options, and the file name used when none is given."""

    convert: Callable[..., list[Conversation]]
    options: tuple[str, ...] = ()
    default_file: str | None = None


SOURCES = {
    "oasst_export": Source(oasst_export, options=("lang", "top_k")),
    "vicuna": Source(vicuna, default_file="ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json"),
    "dolly15k": Source(dolly15k, default_file="databricks-dolly-15k.jsonl"),
    "grade_school_math_instructions": Source(
        grade_school_math_instructions, default_file="grade-school-math-instructions.csv"
    ),
    "code_alpaca": Source(code_alpaca, default_file="code_alpaca_20k.json"),
}
