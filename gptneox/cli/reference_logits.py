"""Write reference logits of a GPT-NeoX checkpoint for prompts, to compare implementations against.

Uses transformers.GPTNeoXForCausalLM as the oracle when it is installed (--engine auto), else ours.
Prompts are space-separated token ids ("12 7 33"), or text when --tokenizer names a tokenizer.json.
The output is a safetensors file with input_ids.<i> and logits.<i> per prompt (fp32) and the engine
and its version in the metadata.

    gptneox-reference-logits --model tests/fixtures/tiny-gptneox \\
        --prompts "1 2 3 4" "5 6 7" --output tests/fixtures/tiny-gptneox-logits.safetensors
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptneox.errors import UserError, report_user_error


def encode(prompts, tokenizer_path):
    if tokenizer_path:
        from gptneox.data import load_tokenizer  # with the chat tokens, as training and chat encode prompts
        tokenizer = load_tokenizer(tokenizer_path)
        return [tokenizer.encode(p).ids for p in prompts]
    try:
        return [[int(t) for t in p.split()] for p in prompts]
    except ValueError:
        raise UserError("--prompts must be space-separated token ids unless --tokenizer is given") from None


def logits_function(model_dir, engine):
    if engine == "auto":
        engine = "transformers" if importlib.util.find_spec("transformers") else "gptneox"
    if engine == "transformers":
        import transformers
        model = transformers.GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return (lambda ids: model(ids).logits), f"transformers {transformers.__version__}"
    from gptneox import GPTNeoX
    model = GPTNeoX.from_pretrained(model_dir).eval()
    model.attention_backend = "eager"
    return model, "gptneox eager"


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face GPT-NeoX model directory")
    parser.add_argument("--prompts", nargs="+", required=True, help="prompts (token ids, or text with --tokenizer)")
    parser.add_argument("--output", required=True, help="output .safetensors file")
    parser.add_argument("--tokenizer", help="tokenizer.json to encode text prompts")
    parser.add_argument("--engine", choices=("auto", "transformers", "gptneox"), default="auto")
    args = parser.parse_args(argv)
    try:
        prompts = encode(args.prompts, args.tokenizer)
        run, engine = logits_function(args.model, args.engine)
    except UserError as err:  # bad prompts, a missing model or tokenizer file
        return report_user_error(parser.prog, err)
    tensors = {}
    for i, ids in enumerate(prompts):
        input_ids = torch.tensor([ids])
        tensors[f"input_ids.{i}"] = input_ids
        tensors[f"logits.{i}"] = run(input_ids).float().contiguous()
    save_file(tensors, args.output, metadata={"engine": engine, "model": Path(args.model).name})
    print(f"wrote {args.output}: {len(args.prompts)} prompts, engine {engine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
