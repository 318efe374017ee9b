"""A conversation with a GPT-NeoX model in the Open-Assistant format: load a model directory and its chat
tokenizer, keep the history within the context, and stream each reply as complete text.

Used by tools/chat.py (the terminal chat), tools/sampling_report.py and the demo.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import torch

from gptneox.adapter import apply_adapter
from gptneox.data import EOS_TOKEN, PAD_TOKEN, format_prompt, load_tokenizer
from gptneox.data.formatting import ROLE_TOKENS
from gptneox.errors import MissingFileError, UserError
from gptneox.generate import generate
from gptneox.hub import find_model
from gptneox.model import GPTNeoX
from gptneox.sizes import VOCAB_MULTIPLE


# The chat's sampling defaults; an exported model carries them in generation_config.json, so transformers'
# generate() and pipeline("text-generation") sample as `chat.py` does.
DEFAULT_SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.0}
DEFAULT_MAX_NEW_TOKENS = 256


class ChatError(UserError):
    """A chat the model cannot hold: an unusable device, a tokenizer that does not fit, a prompt too long."""


def load_model_and_tokenizer(model_dir: str | Path, tokenizer_path: str | Path | None = None,
                             device: str = "cpu", dtype: str | None = None, adapter: str | Path | None = None):
    """An exported model directory and its chat tokenizer (model_dir/tokenizer.json unless tokenizer_path
    is given), for inference; an `org/name` model is looked up in the Hugging Face cache. Training builds
    its model from the training config instead (gptneox.training.model_setup.build_training_model).

    `adapter`: a LoRA adapter directory in peft's format, folded into the model's weights; its tokenizer
    is used when it has one, and the vocabulary grows to fit it as training grew it."""
    try:  # an unusable device (cuda without CUDA, a typo) is named before any weights are read
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ChatError(f"device {device}: {err}") from None
    found, looked = find_model(str(model_dir), [Path.cwd()])
    if found is None:
        raise MissingFileError(f"model directory {model_dir}: not found (looked at: {'; '.join(looked)}); "
                               "nothing is downloaded")
    model_dir = found
    if adapter and Path(adapter).resolve().parent == model_dir.resolve():  # an export's OUT/adapter, beside OUT
        raise ChatError(f"--adapter {adapter} is the adapter {model_dir} already holds merged into its weights: "
                        f"chat with --model {model_dir} alone, or fold the adapter into its base model "
                        f"(--model BASE --adapter {adapter})")
    adapter_tokenizer = Path(adapter) / "tokenizer.json" if adapter else None
    tokenizer_file = (Path(tokenizer_path) if tokenizer_path else adapter_tokenizer
                      if adapter_tokenizer and adapter_tokenizer.is_file() else model_dir / "tokenizer.json")
    if not tokenizer_file.exists():
        raise MissingFileError(f"{tokenizer_file}: tokenizer not found; a model directory needs its "
                               "tokenizer.json (exported checkpoints have one), or give another tokenizer file")
    tokenizer = load_tokenizer(tokenizer_file)
    model = GPTNeoX.from_pretrained(model_dir, dtype=dtype, device=device)
    if adapter:
        if tokenizer.get_vocab_size() > model.config.vocab_size:  # the chat tokens' rows, as in training
            model.resize_token_embeddings(tokenizer.get_vocab_size(), pad_to_multiple_of=VOCAB_MULTIPLE)
        apply_adapter(model, adapter)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ChatError(f"{tokenizer_file} has {tokenizer.get_vocab_size()} tokens but the model in {model_dir} "
                        f"only {model.config.vocab_size} embedding rows; they do not belong together")
    return model, tokenizer


def reply_stop_ids(tokenizer) -> list[int]:
    """A reply ends at eos; a role token would start a new turn, so it ends the reply too."""
    return [tokenizer.token_to_id(token) for token in (EOS_TOKEN, *ROLE_TOKENS.values())]


def save_generation_config(tokenizer, directory: str | Path) -> Path:
    """generation_config.json: stop where the chat stops (eos or a role token), pad with the pad token,
    and sample with the chat's defaults."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    config = {"bos_token_id": eos_id, "eos_token_id": reply_stop_ids(tokenizer),
              "pad_token_id": tokenizer.token_to_id(PAD_TOKEN), "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
              **DEFAULT_SAMPLING}
    path = Path(directory) / "generation_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


class TextStream:
    """Turns token ids arriving one by one into text, releasing only complete characters.

    A byte-level tokenizer may split one character over several tokens; decoding such a prefix yields
    U+FFFD, so text is held back until it decodes cleanly. Only the tokens since the last release are
    re-decoded (together with the previous window, so that decoders that drop a leading space see the
    same context), which keeps the cost linear in the reply length.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window_start = 0  # first token of the context window that is decoded again
        self.released = 0      # tokens whose text has been released

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became complete (often "")."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.window_start:self.released])
        text = decode(self.ids[self.window_start:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.window_start, self.released = self.released, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Text still held back at the end of a reply (an incomplete character shows as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.window_start:self.released])
        text = self.tokenizer.decode(self.ids[self.window_start:])
        self.window_start = self.released = len(self.ids)
        return text[len(before):]


class ChatSession:
    """A conversation with the model: history, context trimming, and one streamed reply per call."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 out: TextIO | None = None, notices: TextIO | None = None, **sampling):
        """Replies stream to `out` and notices go to `notices`: sys.stdout and sys.stderr as they are when the
        session starts (not when this module was imported), so a caller that redirects them is followed."""
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.out = sys.stdout if out is None else out
        self.notices = sys.stderr if notices is None else notices
        self.sampling = sampling
        self.context = model.config.max_position_embeddings
        self.pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.stop_ids = reply_stop_ids(tokenizer)
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str) -> str:
        """Generate, stream and remember the assistant's answer to `text`."""
        prompt_ids = self.prompt_ids(text)
        room = self.context - len(prompt_ids)
        max_new_tokens = min(self.max_new_tokens, room)
        if max_new_tokens < self.max_new_tokens:
            self.notice(f"the reply is limited to {max_new_tokens} tokens: the prompt is {len(prompt_ids)} "
                         f"tokens of the {self.context}-token context")
        stream = TextStream(self.tokenizer)
        pieces = []

        def show(piece: str) -> None:
            if piece:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()

        def on_token(tokens: torch.Tensor) -> None:
            if int(tokens[0]) not in self.stop_ids:
                show(stream.push(int(tokens[0])))

        device = self.model.output_embedding.device
        generate(self.model, torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens,
                 stop_token_ids=self.stop_ids, pad_token_id=self.pad_id, on_token=on_token, **self.sampling)
        show(stream.flush())
        self.out.write("\n")
        self.out.flush()
        answer = "".join(pieces)
        self.history += [{"role": "prompter", "text": text}, {"role": "assistant", "text": answer}]
        return answer

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of the generation prompt for the user's `text`: system + history + text + <|assistant|>,
        dropping the oldest exchanges that do not fit (also what tools/sampling_report.py generates from)."""
        message = {"role": "prompter", "text": text}
        system = [{"role": "system", "text": self.system}] if self.system else []
        dropped = 0
        while True:
            turns = self.history[2 * dropped:] + [message]
            ids = self.tokenizer.encode(format_prompt(system + turns), add_special_tokens=False).ids
            if len(ids) + self.max_new_tokens <= self.context or len(turns) == 1:
                break
            dropped += 1
        if len(ids) >= self.context:  # raised before trimming, so a rejected message keeps the history
            what = "your message with the system text" if system else "your message"
            raise ChatError(f"the prompt is {len(ids)} tokens ({what}), but the model's context is "
                            f"{self.context} tokens, prompt and reply together; please shorten it")
        if dropped:
            self.history = self.history[2 * dropped:]
            self.notice(f"dropped the {dropped} oldest exchange(s) to stay within the {self.context}-token "
                         "context")
        return ids

    def notice(self, text: str) -> None:
        """A line for the user beside the reply stream (stderr by default)."""
        self.notices.write(f"[{text}]\n")
        self.notices.flush()
