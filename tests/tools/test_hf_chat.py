"""An exported model is a chat model for transformers by itself: apply_chat_template builds exactly our
training ids, and pipeline("text-generation") answers chat messages with chat.py's greedy reply."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.data import build_datasets, format_prompt, load_tokenizer
from gptneox.data.formatting import ConversationTokenizer
from gptneox.training.config import load_section, repo_path
from gptneox.training.export import save_chat_model

from tests.helpers import REPO, run_python

transformers = pytest.importorskip("transformers")
HF_ROLES = {"prompter": "user", "assistant": "assistant", "system": "system"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model saved as the training export saves it (save_chat_model)."""
    directory = tmp_path_factory.mktemp("chat-model")
    tokenizer = load_tokenizer(REPO / "data" / "sample" / "tokenizer.json")
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny", max_position_embeddings=128, initializer_range=0.1))
    model.resize_token_embeddings(tokenizer.get_vocab_size(), pad_to_multiple_of=16)
    save_chat_model(model.config, model.state_dict(), tokenizer, directory)
    return directory


def sample_conversations() -> list[list[dict]]:
    """Real conversations of the bundled sample mix (every source), plus a system message and text with odd
    whitespace and a special-token string inside it."""
    section = load_section("sample-mix")
    train, evals = build_datasets(section["datasets"], cache_dir=repo_path(section["cache_dir"]), seed=0)
    conversations = train[:40] + [c for samples in evals.values() for c in samples[:2]]
    conversations.append([{"role": "system", "text": "  Be brief.\n"}, {"role": "prompter", "text": "hi\n\n"},
                          {"role": "assistant", "text": " code: print('<|endoftext|>')  "},
                          {"role": "prompter", "text": "¿y ahora? 日本語"}])
    return conversations


def hf_messages(conversation: list[dict]) -> list[dict]:
    return [{"role": HF_ROLES[m["role"]], "content": m["text"]} for m in conversation]


def test_apply_chat_template_gives_our_training_ids(model_dir):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ours = load_tokenizer(model_dir)
    by_role = ConversationTokenizer(ours)
    conversations = sample_conversations()
    assert len(conversations) > 40 and any(c[-1]["role"] == "assistant" for c in conversations)
    for conversation in conversations:
        expected = ours.encode(format_prompt(conversation), add_special_tokens=False).ids
        rendered = hf_tokenizer.apply_chat_template(hf_messages(conversation), tokenize=False,
                                                    add_generation_prompt=conversation[-1]["role"] != "assistant")
        assert rendered == format_prompt(conversation)
        ids = hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert ids == expected
        if conversation[-1]["role"] == "assistant":
            assert ids == by_role(conversation).ids  # the collator's ids, piece by piece


def test_generation_prompt_ends_with_the_assistant_token(model_dir):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is a meme?"}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|prompter|>What is a meme?<|endoftext|><|assistant|>"
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == "<|prompter|>What is a meme?<|endoftext|>"
    with pytest.raises(Exception, match="unknown role tool; expected system, user or assistant"):
        hf_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


@pytest.mark.slow
def test_pipeline_with_chat_messages_answers_like_the_chat_tool(model_dir):
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["do_sample"] and generation["top_k"] == 0  # the chat's defaults, not transformers'
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, who are you?"}]
    pipe = transformers.pipeline("text-generation", model=str(model_dir), device="cpu", dtype=torch.float32)
    (result,) = pipe(messages, max_new_tokens=12, do_sample=False)
    reply = result["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"]
    chat = run_python(REPO / "tools" / "chat.py", "--model", str(model_dir), "--system", "Be brief.",
                      "--prompt", "Hello, who are you?", "--greedy", "--max_new_tokens", "12")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == reply["content"] + "\n"
