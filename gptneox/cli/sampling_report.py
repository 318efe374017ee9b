"""Answer a fixed set of prompts under several sampling settings and write a JSON and a Markdown report.

Reading the same prompts side by side under greedy, top-k, nucleus and repetition-penalty sampling shows
how a fine-tuned model behaves beyond its loss: whether it stops, repeats itself, or wanders off.
(Open-Assistant's model_eval/manual/sampling_report.py did the same for its SFT models.)

The prompt file is JSONL, one {"prompt": "user message"} per line, optionally with "system"; each prompt
is formatted as one Open-Assistant prompter turn. The default set is the model card's three widget prompts.

    gptneox-sampling-report --model out/sft-7b --output reports/sft-7b.json   # also writes .md
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

from gptneox.chat import ChatError, ChatSession, load_model_and_tokenizer, reply_stop_ids
from gptneox.errors import MissingFileError, UserError, report_user_error
from gptneox.data import PAD_TOKEN
from gptneox.generate import generate, left_pad

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "data" / "prompts" / "model_card.jsonl"

SAMPLING_CONFIGS = {
    "greedy": dict(do_sample=False),
    "k50": dict(do_sample=True, top_k=50),
    "p0.9-t0.8": dict(do_sample=True, top_p=0.9, temperature=0.8),
    "k50-rep1.2": dict(do_sample=True, top_k=50, repetition_penalty=1.2),
    "greedy-rep1.2": dict(do_sample=False, repetition_penalty=1.2),
}


def read_prompts(path: Path) -> list[dict]:
    """[{"prompt", "system"?}] from a JSONL file; a bad line is an error naming the file and line."""
    if not path.is_file():
        raise MissingFileError(f"prompts file {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ChatError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ChatError(f'{where}: expected an object with a non-empty string "prompt", got {line.strip()[:80]}')
        if not isinstance(record.get("system", ""), str):
            raise ChatError(f'{where}: "system" must be a string')
        prompts.append({"prompt": record["prompt"], "system": record.get("system"), "where": where})
    if not prompts:
        raise ChatError(f"{path}: no prompts")
    return prompts


def prompt_ids(model, tokenizer, record: dict) -> list[int]:
    """The prompt a chat session would generate from for this record (a first turn, its system text)."""
    session = ChatSession(model, tokenizer, system=record["system"], max_new_tokens=1)
    try:
        return session.prompt_ids(record["prompt"])
    except ChatError as err:
        raise ChatError(f"{record['where']}: {err}") from None


def sample_replies(model, tokenizer, prompts: list[list[int]], settings: dict, *, max_new_tokens: int,
                   batch_size: int, seed: int) -> tuple[list[dict], int, float]:
    """One reply per prompt: (replies, new tokens generated, seconds)."""
    stop_ids = reply_stop_ids(tokenizer)
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    context = model.config.max_position_embeddings
    device = model.output_embedding.device
    replies, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        input_ids, mask = left_pad(batch, pad_id, device=device)
        longest = max(len(ids) for ids in batch)
        budget = min(max_new_tokens, context - longest)
        if budget < max_new_tokens:
            print(f"[replies to prompts {start + 1}-{start + len(batch)} are limited to {budget} tokens: the "
                  f"longest prompt is {longest} tokens of the {context}-token context]", file=sys.stderr)
        begin = time.perf_counter()
        out = generate(model, input_ids, mask, max_new_tokens=budget, stop_token_ids=stop_ids,
                       pad_token_id=pad_id, seed=seed + start, **settings)
        seconds += time.perf_counter() - begin
        for row in out[:, input_ids.shape[1]:].tolist():
            stop = next((i for i, token in enumerate(row) if token in stop_ids), None)
            reply = row if stop is None else row[:stop]
            new_tokens += len(reply) + (stop is not None)
            replies.append({"text": tokenizer.decode(reply), "tokens": len(reply), "stopped": stop is not None})
    return replies, new_tokens, seconds


def markdown_report(report: dict) -> str:
    lines = [f"# Sampling report: {report['model']}", "",
             f"{report['date']}, max_new_tokens={report['max_new_tokens']}, seed={report['seed']}, "
             f"{report['num_samples']} sample(s) per sampling setting", "",
             "| setting | parameters | replies that stopped | mean reply tokens | tokens/s |",
             "| --- | --- | --- | --- | --- |"]
    for name, summary in report["settings"].items():
        params = ", ".join(f"{k}={v}" for k, v in summary["parameters"].items())
        lines.append(f"| {name} | {params} | {summary['stopped']}/{summary['replies']} | "
                     f"{summary['mean_reply_tokens']:.1f} | {summary['tokens_per_s']:.1f} |")
    for number, entry in enumerate(report["prompts"], start=1):
        lines += ["", f"## Prompt {number}", "", *(f"> {line}" for line in entry["prompt"].splitlines())]
        if entry["system"]:
            lines += ["", f"System: {entry['system']}"]
        for name, replies in entry["replies"].items():
            for index, reply in enumerate(replies, start=1):
                label = name if len(replies) == 1 else f"{name} #{index}"
                ending = "stopped" if reply["stopped"] else "cut at max_new_tokens"
                fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", reply["text"])), default=0))
                lines += ["", f"### {label} ({reply['tokens']} tokens, {ending})", "", fence + "text",
                          reply["text"], fence]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (config.json, weights, tokenizer.json)")
    parser.add_argument("--tokenizer", help="tokenizer.json to use instead of the model directory's")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                        help="JSONL file of {\"prompt\": ...} lines (default: the model card's widget prompts)")
    parser.add_argument("--output", type=Path, default=Path("sampling_report.json"),
                        help="JSON report path; the Markdown report goes next to it (default sampling_report.json)")
    parser.add_argument("--settings", nargs="+", default=list(SAMPLING_CONFIGS), choices=list(SAMPLING_CONFIGS),
                        metavar="NAME", help=f"sampling settings to run (default all: {', '.join(SAMPLING_CONFIGS)})")
    parser.add_argument("--num_samples", type=int, default=1,
                        help="replies per prompt for each sampling setting (greedy ones run once; default 1)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default 8)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampled settings (default 42)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", help="fp32 (default), fp16, bf16 (or float32, float16, bfloat16), or auto (as stored)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.num_samples < 1 or args.batch_size < 1:
            raise UserError("--num_samples and --batch_size must be at least 1")
        records = read_prompts(args.prompts)
        model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer, device, args.dtype)
        prompts = [prompt_ids(model, tokenizer, record) for record in records]
        report = {"model": str(args.model), "prompts_file": str(args.prompts),
                  "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": [parser.prog, *argv],
                  "max_new_tokens": args.max_new_tokens, "seed": args.seed, "num_samples": args.num_samples,
                  "settings": {}, "prompts": [{"prompt": r["prompt"], "system": r["system"], "replies": {}}
                                              for r in records]}
        for name in args.settings:
            settings = SAMPLING_CONFIGS[name]
            samples = args.num_samples if settings["do_sample"] else 1
            tokens = seconds = 0
            for sample in range(samples):
                replies, new_tokens, took = sample_replies(
                    model, tokenizer, prompts, settings, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, seed=args.seed + 1000 * sample)
                tokens, seconds = tokens + new_tokens, seconds + took
                for entry, reply in zip(report["prompts"], replies):
                    entry["replies"].setdefault(name, []).append(reply)
            all_replies = [r for entry in report["prompts"] for r in entry["replies"][name]]
            report["settings"][name] = {
                "parameters": settings, "replies": len(all_replies),
                "stopped": sum(r["stopped"] for r in all_replies),
                "mean_reply_tokens": sum(r["tokens"] for r in all_replies) / len(all_replies),
                "new_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": tokens / max(seconds, 1e-9)}
            print(f"{name}: {len(all_replies)} replies, {tokens} tokens in {seconds:.1f} s", file=sys.stderr)
    except UserError as err:
        return report_user_error(parser.prog, err)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    markdown = args.output.with_suffix(".md")
    markdown.write_text(markdown_report(report), encoding="utf-8")
    print(f"wrote {args.output} and {markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
