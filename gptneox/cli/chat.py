"""Chat with a GPT-NeoX model in the Open-Assistant format, streaming each reply as it is generated.

Every turn is sent as <|prompter|>...<|endoftext|><|assistant|> after the earlier turns (and the optional
--system text); the oldest exchanges are dropped, with a notice, when the history would not leave room
for a reply within the model's context. Type /help for the commands: /reset forgets the history, /quit
(or end of input) leaves.

    gptneox-chat --model out/sft-7b                       # interactive
    gptneox-chat --model out/sft-7b --prompt "What is a meme?" --greedy
    gptneox-chat --model stabilityai/stablelm-base-alpha-7b --adapter out/lora-7b/adapter   # a LoRA adapter
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

import torch

from gptneox.chat import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING, ChatError, ChatSession,
                          load_model_and_tokenizer)
from gptneox.errors import UserError, report_user_error

COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation so far",
            "/quit": "leave (end of input does too)"}


def banner(model_dir: str, session: ChatSession) -> str:
    """One line: which model, its size and context, how it samples, and the commands."""
    parameters = sum(p.numel() for p in session.model.parameters())
    sampling = session.sampling
    how = "greedy" if not sampling.get("do_sample", True) else ", ".join(
        f"{key} {sampling[key]}" for key in ("temperature", "top_k", "top_p", "repetition_penalty") if key in sampling)
    return (f"chat with {model_dir} ({parameters / 1e6:.1f}M parameters, {session.context}-token context, {how}); "
            f"commands: {' '.join(COMMANDS)}")


def run_interactive(session: ChatSession, lines: TextIO) -> None:
    """Read one message per line until /quit or end of input; a line of one word starting with / is a
    command, never sent to the model."""
    interactive = lines.isatty()
    while True:
        if interactive:
            session.out.write("\n>>> ")
            session.out.flush()
        line = lines.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and " " not in text:
            if text == "/quit":
                break
            if text == "/reset":
                session.reset()
                session.notice("history cleared")
            elif text == "/help":
                session.notice("; ".join(f"{name}: {what}" for name, what in COMMANDS.items()))
            else:
                session.notice(f"unknown command {text}; /help lists the commands")
            continue
        try:
            session.reply(text)
        except ChatError as err:
            session.notice(f"error: {err}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer.json)")
    parser.add_argument("--adapter", help="a LoRA adapter directory in peft's format (OUT/adapter of a LoRA run, "
                                          "or one peft saved) to apply over --model, the base model")
    parser.add_argument("--tokenizer", help="tokenizer.json to use instead of the model directory's "
                                            "(or the adapter's)")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system text put before the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"longest reply in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--greedy", action="store_true", help="always pick the most likely token (no sampling)")
    parser.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING["temperature"],
                        help="sampling temperature (default %(default)s)")
    parser.add_argument("--top_k", type=int, default=DEFAULT_SAMPLING["top_k"],
                        help="sample from the k most likely tokens (0 = off; default %(default)s)")
    parser.add_argument("--top_p", type=float, default=DEFAULT_SAMPLING["top_p"],
                        help="nucleus sampling mass (1 = off; default %(default)s)")
    parser.add_argument("--repetition_penalty", type=float, default=DEFAULT_SAMPLING["repetition_penalty"],
                        help="> 1 discourages tokens already in the conversation (default %(default)s = off)")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", help="fp32 (default), fp16, bf16 (or float32, float16, bfloat16), or auto (as stored)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, args.device, args.dtype,
                                                    adapter=args.adapter)
        generator = None if args.seed is None else torch.Generator(device=args.device).manual_seed(args.seed)
        session = ChatSession(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                              do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, generator=generator)
        if args.prompt is not None:
            session.reply(args.prompt)
        else:
            session.notice(banner(args.model, session))
            run_interactive(session, sys.stdin)
    except UserError as err:  # files, device, sampling flags that generate() rejects
        return report_user_error(parser.prog, err)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
