"""Helpers shared by the tests: run a script as a user would, tiny random models, Hugging Face layouts."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from gptneox import GPTNeoX, GPTNeoXConfig

REPO = Path(__file__).resolve().parents[1]
# Set in this process by the in-process DeepSpeed tests; a script started by a test must not inherit them.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_python(*argv, stdin: str = "", cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a script (train.py, a tool, a benchmark) in a fresh interpreter, from the repository root."""
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return subprocess.run([sys.executable, *map(str, argv)], input=stdin, cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def run_main(main: Callable[[list[str]], int | None], script: str, *argv, stdin: str = "") -> subprocess.CompletedProcess:
    """A command's `main(argv)` in this process, answered as run_python answers `python SCRIPT ARGV`: its exit
    status, stdout and stderr, with `script` as the name it reports itself by. For commands that only read,
    plan and print, where a fresh interpreter would spend seconds importing torch for milliseconds of work."""
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_stdin = sys.argv, sys.stdin
    sys.argv, sys.stdin = [script, *argv], io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exit_:  # argparse's --help and usage errors; sys.exit(message) as Python does
                status = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
                if not isinstance(exit_.code, int) and exit_.code is not None:
                    print(exit_.code, file=sys.stderr)
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
    return subprocess.CompletedProcess([script, *argv], status or 0, out.getvalue(), err.getvalue())


# Small enough for milliseconds per forward, with a head count that is not a power of two.
TINY_CONFIG = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                   intermediate_size=96, max_position_embeddings=128, rotary_pct=0.5)


def write_hf_checkpoint(directory: Path, config_json: dict, state_dict: dict, fmt: str = "safetensors",
                        num_shards: int = 1) -> Path:
    """Write config.json and weights the way transformers does: model.safetensors / pytorch_model.bin, or
    numbered shards plus an index when num_shards > 1. Independent of our own save_pretrained."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    names = list(state_dict)
    groups = [names[i::num_shards] for i in range(num_shards)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files = ([f"{stem}.{ext}"] if num_shards == 1 else
             [f"{stem}-{i + 1:05d}-of-{num_shards:05d}.{ext}" for i in range(num_shards)])
    for file_name, group in zip(files, groups):
        tensors = {k: state_dict[k].detach().clone().contiguous() for k in group}
        if fmt == "safetensors":
            save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / file_name)
    if num_shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, g in zip(files, groups) for k in g}}
        (directory / f"{files[0].split('-')[0]}.{ext}.index.json").write_text(json.dumps(index))
    return directory


def random_model(seed: int = 0, **overrides) -> GPTNeoX:
    """A tiny model with random (not default-initialised) LayerNorms and biases, so every parameter matters."""
    torch.manual_seed(seed)
    model = GPTNeoX(GPTNeoXConfig(**{**TINY_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model
