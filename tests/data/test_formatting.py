"""Chat format text, conversation validation, and per-token roles."""
from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import assume, given, settings, strategies as st

from gptneox.data import SPECIAL_TOKENS, ConversationError, format_prompt, load_tokenizer, normalize_conversation
from gptneox.data.formatting import ConversationTokenizer

TOKENIZER = load_tokenizer(Path(__file__).resolve().parents[2] / "data" / "sample" / "tokenizer.json")


def test_training_text_matches_the_reference_format():
    conversation = [
        {"role": "prompter", "text": "Q1"},
        {"role": "assistant", "text": "A1"},
        {"role": "prompter", "text": "Q2"},
        {"role": "assistant", "text": "A2"},
    ]
    assert format_prompt(conversation) == (
        "<|prompter|>Q1<|endoftext|><|assistant|>A1<|endoftext|><|prompter|>Q2<|endoftext|><|assistant|>A2<|endoftext|>"
    )


def test_generation_prompt_ends_with_assistant_token():
    text = format_prompt([{"role": "prompter", "text": "What is a meme, and what's the history behind this word?"}])
    assert text == "<|prompter|>What is a meme, and what's the history behind this word?<|endoftext|><|assistant|>"


def test_system_message_comes_first():
    text = format_prompt([{"role": "system", "text": "Be brief."}, {"role": "prompter", "text": "Hi"}])
    assert text == "<|system|>Be brief.<|endoftext|><|prompter|>Hi<|endoftext|><|assistant|>"


def test_plain_string_lists_alternate_from_the_prompter():
    assert normalize_conversation(["q", "a", "q2"]) == [
        {"role": "prompter", "text": "q"},
        {"role": "assistant", "text": "a"},
        {"role": "prompter", "text": "q2"},
    ]


@pytest.mark.parametrize(
    "sample, message",
    [
        ("just a string", "expected a list of messages"),
        ([], "empty"),
        ([{"role": "user", "text": "x"}], "unknown role 'user'"),
        ([{"role": "prompter"}], "no 'text'"),
        ([{"text": "x"}], "no 'role'"),
        ([{"role": "prompter", "text": 3}], "text is a int"),
        ([{"role": "assistant", "text": "x"}], "message 0 has role 'assistant' where 'prompter'"),
        ([{"role": "prompter", "text": "x"}, {"role": "system", "text": "s"}], "message 1 has role 'system'"),
        ([{"role": "prompter", "text": "x"}, 5], "message 1 is a int"),
    ],
)
def test_bad_conversations_are_named(sample, message):
    with pytest.raises(ConversationError, match=message):
        normalize_conversation(sample)


def _conversation(system, turns):
    messages = [{"role": "system", "text": system}] if system is not None else []
    for index, text in enumerate(turns):
        messages.append({"role": ("prompter", "assistant")[index % 2], "text": text})
    return messages


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
# Random text rarely produces what matters at piece boundaries: special-token strings and whitespace runs.
boundary_texts = st.lists(st.one_of(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                                            max_size=10),
                                    st.sampled_from([*SPECIAL_TOKENS, " ", "\n", "  ", " \n"])),
                          max_size=6).map("".join)


@settings(max_examples=150, deadline=None)
@given(system=st.none() | boundary_texts, turns=st.lists(boundary_texts, min_size=1, max_size=6))
def test_piecewise_tokens_equal_tokens_of_the_whole_text(system, turns):
    """Tokenizing each piece gives exactly the ids of the formatted string: no merge crosses a boundary."""
    conversation = _conversation(system, turns)
    tokens = ConversationTokenizer(TOKENIZER)(conversation)
    text = format_prompt(conversation)
    if conversation[-1]["role"] != "assistant":
        text = text[: -len("<|assistant|>")]
    assert tokens.ids == TOKENIZER.encode(text).ids
    assert len(tokens.in_reply) == len(tokens.ids)


@settings(max_examples=150, deadline=None)
@given(system=st.none() | texts, turns=st.lists(texts, min_size=1, max_size=6))
def test_reply_tokens_decode_to_the_assistant_replies_with_eos(system, turns):
    assume(not any("<|" in text for text in turns + [system or ""]))  # special strings: see the next test
    conversation = _conversation(system, turns)
    tokens = ConversationTokenizer(TOKENIZER)(conversation)
    reply_ids = [i for i, flag in zip(tokens.ids, tokens.in_reply) if flag]
    # the tokenizer normalizes text to NFC, as the GPT-NeoX one does
    expected = "".join(unicodedata.normalize("NFC", m["text"]) + "<|endoftext|>" for m in conversation
                       if m["role"] == "assistant")
    assert TOKENIZER.decode(reply_ids, skip_special_tokens=False) == expected
    role_ids = {TOKENIZER.token_to_id(t) for t in ("<|prompter|>", "<|assistant|>", "<|system|>")}
    assert not any(flag and i in role_ids for i, flag in zip(tokens.ids, tokens.in_reply))


def test_special_token_strings_inside_text_are_never_trained():
    conversation = [
        {"role": "prompter", "text": "Say <|assistant|> please"},
        {"role": "assistant", "text": "Here: <|assistant|> and <|endoftext|> done"},
    ]
    tokens = ConversationTokenizer(TOKENIZER)(conversation)
    assert tokens.ids == TOKENIZER.encode(format_prompt(conversation)).ids
    trained = [i for i, flag in zip(tokens.ids, tokens.in_reply) if flag]
    assert TOKENIZER.decode(trained, skip_special_tokens=False) == "Here:  and  done<|endoftext|>"
    assert trained.count(TOKENIZER.token_to_id("<|endoftext|>")) == 1  # only the closing eos
