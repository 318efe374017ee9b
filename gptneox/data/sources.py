"""Dataset sources: how each named dataset's records become conversations.

The conversion rules follow the Open-Assistant ``stable_lm_training`` branch (the code that trained
StableLM SFT-7). Each converter returns the conversations of one *unit*: a whole message tree for
``oasst_export`` (so that the train/validation split keeps every tree on one side), one record for
the others. A record that cannot be read raises ``RecordError`` naming the field (the caller adds file
and line); a readable record that gives nothing to train on is counted in ``drops`` under its reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from gptneox.data.formatting import Conversation
from gptneox.data.oasst_rows import MessageRows
from gptneox.data.readers import RecordError

MAX_MESSAGE_CHARS = 2048  # the reference cut vicuna and dolly messages to this many characters
CODE_ALPACA_BANNED_WORDS = ("openai",)  # the reference's FILTER_BY_WORDS at the time of SFT-7

# Why a record (or, marked "thread", one oasst thread) gives no conversation: the keys of ``drops``.
EMPTY = "empty"
NOT_PROMPTER_FIRST = "not starting with a human turn"
OTHER_SPEAKER = "system or unknown speaker after the first turn"
NO_REPLY = "no assistant reply"
LANGUAGE = "language"
REVIEW_STATE = "review state"
DELETED_OR_SYNTHETIC = "thread with a deleted/synthetic message"
RANK = "thread with an assistant ranked >= top_k or unranked"
BANNED_WORD = "banned word"
BAD_RECORD = "bad record"
UNREAD_REST = "unreadable rest of a file (files)"  # counted per file: how many records it held is unknown


def _get(record: Any, field: str, kind: type | tuple[type, ...] = str, path: str | None = None,
         default: Any = ...) -> Any:
    """``record[field]`` checked to be of ``kind`` (a type or a tuple of them); ``default`` (if given) when
    absent or null."""
    name = path or field
    if not isinstance(record, dict):
        raise RecordError(name, f"cannot be read: its container is a {type(record).__name__}, not an object")
    value = record.get(field)
    if value is None:
        if default is not ...:
            return default
        raise RecordError(name, "missing")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise RecordError(name, f"expected {expected}, got {type(value).__name__}")
    return value


def _pair(question: str, answer: str) -> list[Conversation]:
    return [[{"role": "prompter", "text": question}, {"role": "assistant", "text": answer}]]


# --- oasst_export: message trees ------------------------------------------------------------------


def oasst_export(record: Any, drops: Counter, lang: str | list[str] = "en", top_k: int | None = None
                 ) -> list[Conversation]:
    """Every root-to-leaf thread of a reviewed, exportable tree in an accepted language.

    A thread ends on an assistant leaf, or on a prompter leaf that is its parent's first reply (that
    prompter turn is then dropped). Threads through deleted or synthetic messages are skipped; with
    ``top_k``, so are threads through an assistant ranked ``>= top_k`` or unranked among siblings.
    """
    languages = set(lang.split(",") if isinstance(lang, str) else lang)
    root = _get(record, "prompt", dict)
    if _get(record, "tree_state") != "ready_for_export" or not root.get("review_result"):
        drops[REVIEW_STATE] += 1
        return []
    if _get(root, "lang", path="prompt.lang") not in languages:
        drops[LANGUAGE] += 1
        return []
    threads: list[Conversation] = []
    thread_drops: Counter = Counter()
    _visit(root, "prompt", [], None, threads, top_k, thread_drops)
    drops.update(thread_drops)
    if not threads and not thread_drops:  # a tree whose threads were all filtered is counted by their reasons
        drops[NO_REPLY] += 1
    return threads


def _visit(node: dict, where: str, path: list[dict], parent: dict | None, out: list, top_k: int | None,
           drops: Counter) -> None:
    role = _get(node, "role", path=f"{where}.role")
    expected = "prompter" if parent is None or parent["role"] == "assistant" else "assistant"
    if role not in ("prompter", "assistant"):
        raise RecordError(f"{where}.role", f"unknown role {role!r}; expected 'prompter' or 'assistant'")
    if role != expected:
        raise RecordError(f"{where}.role", f"{role!r} follows a {'nothing' if parent is None else parent['role']!r}")
    _get(node, "text", path=f"{where}.text")
    _get(node, "rank", int, path=f"{where}.rank", default=None)  # _thread_drop compares it
    replies = _get(node, "replies", list, path=f"{where}.replies", default=[])
    path = path + [node]
    if not replies and len(path) > 1:
        ends_on_first_prompter = role == "prompter" and parent["replies"][0] is node
        if role == "assistant" or ends_on_first_prompter:
            reason = _thread_drop(path, top_k)
            if reason:
                drops[reason] += 1
            else:
                kept = path if role == "assistant" else path[:-1]
                out.append([{"role": n["role"], "text": n["text"]} for n in kept])
    for index, child in enumerate(replies):
        _visit(child, f"{where}.replies[{index}]", path, node, out, top_k, drops)


def _thread_drop(path: list[dict], top_k: int | None) -> str | None:
    """Why the reference's thread filter rejects this root-to-leaf path; None when it keeps it."""
    if any(node.get("deleted") or node.get("synthetic") for node in path):
        return DELETED_OR_SYNTHETIC
    if top_k is None:
        return None
    for parent, node in zip(path, path[1:]):
        if node["role"] != "assistant":
            continue
        rank = node.get("rank")
        if (rank is None and len(parent["replies"]) > 1) or (rank is not None and rank >= top_k):
            return RANK
    return None


# --- multi-turn chats ----------------------------------------------------------------------------

SHAREGPT_ROLES = {"human": "prompter", "user": "prompter",
                  "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "assistant": "assistant", "model": "assistant"}
CHAT_ROLES = {"system": "system", "user": "prompter", "assistant": "assistant"}


def vicuna(record: Any, drops: Counter) -> list[Conversation]:
    """ShareGPT ``conversations`` of ``{from, value}``, as the real files have them.

    ``human``/``user`` are the prompter, ``gpt``/``chatgpt``/``bing``/``bard``/``assistant``/``model`` the
    assistant. As in the reference, a conversation that is empty or does not start with a human turn
    (``gpt``, ...) is dropped, turns of one speaker join with a newline, the dump's markdown escapes are
    undone and each message is cut to 2,048 characters. A top-level ``system`` string (files written for
    FastChat and LLaMA-Factory) becomes the ``<|system|>`` turn, as in ``chat``; so does a leading ``system``
    turn (axolotl, LLaMA-Factory, OpenHermes, SlimOrca). A record with both is a bad record: which one was
    meant is not known. A ``system`` turn after the first is another speaker, so its conversation is dropped.
    """
    turns = _get(record, "conversations", list)
    system = _get(record, "system", default="") or None  # an empty one is no system prompt
    dialogue = []
    for index, turn in enumerate(turns):
        speaker = _get(turn, "from", path=f"conversations[{index}].from")
        value = _get(turn, "value", path=f"conversations[{index}].value")
        text = value.replace("\\_", "_").replace("\\*", "*")  # undo the dump's markdown escaping
        role = "system" if speaker.lower() == "system" else SHAREGPT_ROLES.get(speaker.lower())
        dialogue.append((role, text))
    if dialogue and dialogue[0][0] == "system":
        if system is not None:
            raise RecordError("conversations[0].from", "a system turn, and the record also has a top-level "
                                                       "'system' string; keep one of them")
        system = dialogue.pop(0)[1] or None
    dialogue = [(None if role == "system" else role, text) for role, text in dialogue]
    conversations = _with_system(system, _dialogue(dialogue, drops))
    return [[{"role": m["role"], "text": m["text"][:MAX_MESSAGE_CHARS]} for m in c] for c in conversations]


def chat(record: Any, drops: Counter) -> list[Conversation]:
    """``messages: [{role: system|user|assistant, content}]`` (TRL, axolotl, OpenAI fine-tuning files).

    ``content`` is a string or a list of parts; text parts are joined (see ``_content``). A leading system
    message becomes the ``<|system|>`` turn; then the same rules as ShareGPT: it must start with a user
    turn, turns of one role join with a newline, a trailing user turn is dropped. OpenAI's per-message
    ``weight`` may be 1; ``weight: 0`` asks to leave a turn out of training, which cannot be done for one
    turn here, so such a record is a bad record rather than silently trained (see ``_check_weight``).
    """
    messages = _get(record, "messages", list)
    dialogue = []
    for index, message in enumerate(messages):
        role = _get(message, "role", path=f"messages[{index}].role")
        if role not in CHAT_ROLES:
            raise RecordError(f"messages[{index}].role", f"unknown role {role!r}; expected {', '.join(CHAT_ROLES)}")
        _check_weight(message, role, f"messages[{index}].weight")
        dialogue.append((CHAT_ROLES[role], _content(message, f"messages[{index}].content")))
    system = dialogue.pop(0)[1] if dialogue and dialogue[0][0] == "system" else None
    conversations = _dialogue([(None if role == "system" else role, text) for role, text in dialogue], drops)
    return _with_system(system, conversations)


def _check_weight(message: dict, role: str, where: str) -> None:
    """OpenAI fine-tuning's ``weight`` (0 or 1, meant for assistant messages): absent, null or 1 is how every
    reply is trained. 0 on an assistant message asks not to train that reply, which cannot be done for one
    turn here, so the record is refused rather than trained against the file's wish; on a system or user
    message, which is never trained, 0 changes nothing. Any other value is refused."""
    weight = message.get("weight")
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        raise RecordError(where, f"{weight!r}; expected 1 (train the turn) or 0 (not supported here)")
    if weight == 0 and role == "assistant":
        raise RecordError(where, "0 asks not to train this assistant turn, but a single turn cannot be left out "
                                 "of training here: the turn would be trained (remove the turn, or set weight 1)")


def _content(message: Any, where: str) -> str:
    """A message's text: a string, or a list of parts whose text parts are concatenated as chat templates
    render them. A text part holds ``text`` (OpenAI, TRL) or ``value`` (LLaMA-Factory); any other part
    (image, audio, ...) cannot be trained here, so its record is a bad record."""
    content = _get(message, "content", (str, list), path=where)
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        kind = _get(part, "type", path=f"{where}[{index}].type")
        if kind != "text":
            raise RecordError(f"{where}[{index}].type", f"a {kind!r} part; only text parts can be trained")
        key = "value" if part.get("text") is None and part.get("value") is not None else "text"  # parquet has both
        texts.append(_get(part, key, path=f"{where}[{index}].{key}"))
    return "".join(texts)


def _with_system(system: str | None, conversations: list[Conversation]) -> list[Conversation]:
    """The system text as each conversation's first turn (none when there is no system text)."""
    if system is None:
        return conversations
    return [[{"role": "system", "text": system}] + c for c in conversations]


def _dialogue(turns: list[tuple[str | None, str]], drops: Counter) -> list[Conversation]:
    """Prompter/assistant turns (role None: any other speaker) -> [conversation], or [] with a drop counted."""
    if not turns:
        drops[EMPTY] += 1
        return []
    if turns[0][0] != "prompter":
        drops[NOT_PROMPTER_FIRST] += 1
        return []
    if any(role is None for role, _ in turns):
        drops[OTHER_SPEAKER] += 1
        return []
    messages: Conversation = []
    for role, text in turns:
        if messages and messages[-1]["role"] == role:
            messages[-1]["text"] += "\n" + text
        else:
            messages.append({"role": role, "text": text})
    if messages[-1]["role"] == "prompter":  # a trailing question has nothing to train
        messages.pop()
    if not messages:
        drops[NO_REPLY] += 1
        return []
    return [messages]


# --- single pairs ---------------------------------------------------------------------------------


_NUMBERED_REFERENCE = re.compile(r"\[\d+(?:\s*[,–-]\s*\d+)*\]")
_LETTER_REFERENCE = re.compile(r"\[[a-zA-Z]\]")


def _clean_context(context: str) -> str:
    """Remove Wikipedia reference marks: ``[12]``, ``[3, 4]``, ``[citation needed]``, ``[a]``, ``[B]``."""
    context = _NUMBERED_REFERENCE.sub("", context).replace("[citation needed]", "")
    return _LETTER_REFERENCE.sub("", context).strip()


def dolly15k(record: Any, drops: Counter) -> list[Conversation]:
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
        except ValueError:  # bad JSON, or an integer of more digits than Python reads
            raise RecordError("METADATA", "a string that cannot be read as a JSON object") from None
    if metadata is None:
        return ""
    return _get(metadata, "CONTEXT", path="METADATA.CONTEXT", default="")


_CALCULATOR_MARK = re.compile(r"<<[^<>]*>>")


def grade_school_math_instructions(record: Any, drops: Counter, keep_final_answer: bool = False
                                   ) -> list[Conversation]:
    """The reference's hub copy (``INSTRUCTION`` -> ``RESPONSE``) or OpenAI's GSM8K (``question``/``answer``).

    From an original answer the ``<<48/2=24>>`` calculator marks and the final ``#### 72`` line are
    removed, as in the hub copy; ``keep_final_answer`` turns that line into a last sentence instead. The
    question is the prompt as it is (the hub copy wrapped it in a random instruction template).
    """
    if not (isinstance(record, dict) and "question" in record):
        return _pair(_get(record, "INSTRUCTION"), _get(record, "RESPONSE"))
    question, answer = _get(record, "question"), _get(record, "answer")
    working, marker, result = answer.rpartition("####")
    if not marker or "\n" in result.strip():
        raise RecordError("answer", "has no final '#### <number>' line")
    answer = _CALCULATOR_MARK.sub("", working).rstrip()
    if keep_final_answer:
        answer += f"\nThe answer is {result.strip()}."
    return _pair(question, answer)


def code_alpaca(record: Any, drops: Counter) -> list[Conversation]:
    """``instruction`` (+ ``"\\n" + input`` when given) -> ``output``; pairs mentioning OpenAI are dropped."""
    (pair,) = alpaca(record, drops)
    if any(word in m["text"].lower() for m in pair for word in CODE_ALPACA_BANNED_WORDS):
        drops[BANNED_WORD] += 1
        return []
    return [pair]


def alpaca(record: Any, drops: Counter) -> list[Conversation]:
    """``instruction`` (+ ``"\\n" + input`` when given) -> ``output``, the reference's alpaca rule."""
    instruction = _get(record, "instruction")
    extra = _get(record, "input", default="")
    output = _get(record, "output")
    return _pair(f"{instruction}\n{extra}" if extra else instruction, output)


@dataclass(frozen=True)
class Source:
    """A named dataset: its converter, its own options, the file name used when none is given, for sources
    whose units span records the class that gathers such records into units, and for the reference's
    sources the hub dataset it loaded (``hub_repo``) with the file names looked up there when they are not
    in cache_dir (``stock_files``: the default file, or the export oasst-mix names)."""

    convert: Callable[..., list[Conversation]]
    options: tuple[str, ...] = ()
    default_file: str | None = None
    gather: type | None = None
    hub_repo: str | None = None
    stock_files: tuple[str, ...] = ()


def _stock(convert: Callable, default_file: str, hub_repo: str, **fields: Any) -> Source:
    """A reference source whose default file is looked up in its hub repo when cache_dir lacks it."""
    return Source(convert, default_file=default_file, hub_repo=hub_repo, stock_files=(default_file,), **fields)


# The hub repos of the reference's loaders (Open-Assistant model/model_training/custom_datasets at the
# stable_lm_training branch; oasst_export's is the one its later `hf_dataset_name` default names).
SOURCES = {
    "oasst_export": Source(oasst_export, options=("lang", "top_k"), gather=MessageRows,
                           hub_repo="OpenAssistant/oasst1",
                           stock_files=("2023-04-12_oasst_release_ready_synth.jsonl.gz",)),
    "vicuna": _stock(vicuna, "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry.json",
                     "anon8231489123/ShareGPT_Vicuna_unfiltered"),
    "dolly15k": _stock(dolly15k, "databricks-dolly-15k.jsonl", "OllieStanley/oa_dolly_15k"),
    "grade_school_math_instructions": _stock(
        grade_school_math_instructions, "grade-school-math-instructions.csv",
        "qwedsacf/grade-school-math-instructions", options=("keep_final_answer",)),
    "code_alpaca": _stock(code_alpaca, "code_alpaca_20k.json", "sahil2801/CodeAlpaca-20k"),
    "chat": Source(chat),
    "alpaca": Source(alpaca),
}
