"""tools/chat.py and tools/sampling_report.py on a tiny random model with the bundled sample tokenizer: run as
users run them (subprocesses) for their replies, and their refusals and commands through the same `main` in
this process; checked against the same session driven in-process."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.data import format_prompt, load_tokenizer, save_tokenizer

from gptneox.chat import ChatSession, TextStream, load_model_and_tokenizer
from gptneox.cli.chat import main as chat_main
from gptneox.cli.sampling_report import main as sampling_report_main

from tests.helpers import REPO, run_main, run_python

CHAT = REPO / "tools" / "chat.py"
REPORT = REPO / "tools" / "sampling_report.py"
CONTEXT = 128
IN_PROCESS = {CHAT: chat_main, REPORT: sampling_report_main}


def run_here(script: Path, *argv, stdin: str = ""):
    """`python SCRIPT ARGV` answered by the script's main in this process (no fresh interpreter and torch)."""
    return run_main(IN_PROCESS[script], script.name, *argv, stdin=stdin)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Random tiny model + the sample tokenizer, saved as an exported checkpoint directory."""
    directory = tmp_path_factory.mktemp("tiny-chat-model")
    tokenizer = load_tokenizer(REPO / "data" / "sample" / "tokenizer.json")
    torch.manual_seed(0)
    config = GPTNeoXConfig.from_name("tiny", max_position_embeddings=CONTEXT, initializer_range=0.1)
    model = GPTNeoX(config)
    model.resize_token_embeddings(tokenizer.get_vocab_size(), pad_to_multiple_of=16)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


def session(model_dir: Path, **kwargs):
    model, tokenizer = load_model_and_tokenizer(model_dir)
    out, notices = io.StringIO(), io.StringIO()
    options = dict(max_new_tokens=12, do_sample=False)
    return ChatSession(model, tokenizer, out=out, notices=notices, **{**options, **kwargs}), out, notices


@pytest.mark.slow
def test_one_shot_prints_the_streamed_greedy_reply(model_dir):
    chat_session, out, _ = session(model_dir, system="Be brief.")
    reply = chat_session.reply("Hello there, who are you?")
    result = run_python(CHAT, "--model", str(model_dir), "--prompt", "Hello there, who are you?",
                      "--system", "Be brief.", "--greedy", "--max_new_tokens", "12")
    assert result.returncode == 0, result.stderr
    assert reply and result.stdout == reply + "\n" == out.getvalue()
    assert result.stderr == ""  # one answer: no banner


@pytest.mark.slow
def test_piped_multi_turn_chat_keeps_history_and_resets(model_dir):
    chat_session, out, _ = session(model_dir)
    first = chat_session.reply("hi")
    second = chat_session.reply("tell me more")
    chat_session.reset()
    after_reset = chat_session.reply("tell me more")
    assert after_reset != second, "the history should change the second reply"
    result = run_python(CHAT, "--model", str(model_dir), "--greedy", "--max_new_tokens", "12",
                      stdin="hi\n\ntell me more\n/reset\ntell me more\n/quit\nnever answered\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{first}\n{second}\n{after_reset}\n" == out.getvalue()
    assert "history cleared" in result.stderr


def test_end_of_input_exits_after_the_banner(model_dir):
    result = run_here(CHAT, "--model", str(model_dir), stdin="")
    assert result.returncode == 0 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"[chat with {model_dir} (") and "128-token context" in line
    assert "temperature 0.8" in line and line.endswith("commands: /help /reset /quit]")


def test_help_and_unknown_commands_are_answered_not_sent_to_the_model(model_dir):
    chat_session, _, _ = session(model_dir)
    reply = chat_session.reply("hi")
    result = run_here(CHAT, "--model", str(model_dir), "--greedy", "--max_new_tokens", "12",
                        stdin="/help\n/frobnicate\nhi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{reply}\n"  # the first message the model saw was "hi"
    notices = result.stderr.splitlines()
    assert "greedy" in notices[0]
    assert notices[1] == ("[/help: list these commands; /reset: forget the conversation so far; "
                          "/quit: leave (end of input does too)]")
    assert notices[2] == "[unknown command /frobnicate; /help lists the commands]"


def test_oldest_turns_are_dropped_to_fit_the_context(model_dir):
    chat_session, _, notices = session(model_dir, max_new_tokens=20)
    tokenizer = chat_session.tokenizer
    message = "please tell me a long story about the sea and the ships"
    for _ in range(5):
        chat_session.reply(message)
        prompt = format_prompt(chat_session.history[:-1])  # what this reply was generated from
        assert len(tokenizer.encode(prompt, add_special_tokens=False).ids) + 20 <= CONTEXT
    assert "oldest exchange(s) to stay within the 128-token context" in notices.getvalue()
    assert 4 <= len(chat_session.history) < 10  # older turns kept where they fit, the oldest gone


def test_too_long_prompt_is_a_clear_error(model_dir):
    long_message = "word " * 150
    result = run_here(CHAT, "--model", str(model_dir), "--prompt", long_message)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "the prompt is" in result.stderr and "context is 128 tokens" in result.stderr
    # interactively the message is refused, the history kept, and the chat goes on
    piped = run_here(CHAT, "--model", str(model_dir), "--greedy", "--max_new_tokens", "4",
                     stdin=f"hi\n{long_message}\nhi again\n")
    assert piped.returncode == 0 and "context is 128 tokens" in piped.stderr
    chat_session, _, _ = session(model_dir, max_new_tokens=4)  # the refused message left no trace
    assert piped.stdout == f"{chat_session.reply('hi')}\n{chat_session.reply('hi again')}\n"


def test_reply_is_limited_when_the_prompt_leaves_little_room(model_dir):
    chat_session, _, notices = session(model_dir, max_new_tokens=120)
    chat_session.reply("a question of some length that takes a few tokens")
    assert "the reply is limited to" in notices.getvalue()


def test_model_directory_without_tokenizer_is_a_clear_error(model_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    result = run_here(CHAT, "--model", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'tokenizer.json'}: tokenizer not found" in result.stderr


def test_bad_sampling_flag_is_a_clear_error(model_dir):
    result = run_here(CHAT, "--model", str(model_dir), "--prompt", "hi", "--temperature", "0")
    assert result.returncode == 2 and "temperature must be > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_unusable_device_is_a_clear_error(model_dir, tmp_path):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"  # a device this machine does not have
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    for script, args in ((CHAT, ("--prompt", "hi", "--seed", "1")),
                         (REPORT, ("--prompts", str(prompts), "--output", str(tmp_path / "r.json")))):
        result = run_here(script, "--model", str(model_dir), "--device", device, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{script.name}: error: device {device}: " in result.stderr


def test_stream_releases_only_complete_characters(model_dir):
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    text = "Grüße 🙂 and 日本 done"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "" in pieces, "the emoji spans several byte tokens, so some pushes must hold text back"
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == tokenizer.decode(ids) == text


def test_stream_flush_shows_an_unfinished_character(model_dir):
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    ids = tokenizer.encode("ok 🙂", add_special_tokens=False).ids
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids[:-1]]  # the emoji's last byte never arrives
    held = stream.flush()
    assert "".join(pieces) == "ok " and held and set(held) == {"\ufffd"}


@pytest.mark.slow
def test_sampling_report_writes_json_and_markdown(model_dir, tmp_path):
    output = tmp_path / "report" / "tiny.json"
    result = run_python(REPORT, "--model", str(model_dir), "--output", str(output), "--settings", "greedy", "k50",
                      "--num_samples", "2", "--max_new_tokens", "10", "--batch_size", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    widget_prompts = [json.loads(line)["prompt"]
                      for line in (REPO / "data" / "prompts" / "model_card.jsonl").read_text().splitlines()]
    assert [entry["prompt"] for entry in report["prompts"]] == widget_prompts
    for entry in report["prompts"]:
        assert len(entry["replies"]["greedy"]) == 1 and len(entry["replies"]["k50"]) == 2
        assert all(0 < reply["tokens"] <= 10 for replies in entry["replies"].values() for reply in replies)
    assert report["settings"]["k50"]["parameters"] == {"do_sample": True, "top_k": 50}
    # batched, left-padded greedy replies equal the chat's one-at-a-time greedy replies
    chat_session, _, _ = session(model_dir, max_new_tokens=10)
    for entry in report["prompts"]:
        chat_session.reset()
        assert entry["replies"]["greedy"][0]["text"] == chat_session.reply(entry["prompt"])
    markdown = output.with_suffix(".md").read_text()
    assert "## Prompt 3" in markdown and widget_prompts[2] in markdown and "### k50 #2" in markdown


def test_sampling_report_names_a_bad_prompt_line(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"text": "no prompt key"}\n')
    result = run_here(REPORT, "--model", str(model_dir), "--prompts", str(prompts),
                      "--output", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{prompts}:2" in result.stderr and '"prompt"' in result.stderr
