"""Shared fixtures: tiny random GPT-NeoX models and checkpoints written in every Hugging Face layout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptneox import GPTNeoX, GPTNeoXConfig

REPO = Path(__file__).resolve().parents[1]
# The suite is the CPU suite on every machine: DeepSpeed picks its CUDA accelerator whenever a GPU is visible
# (deepspeed/accelerator/real_accelerator.py), which would build FusedAdam and place the engines on the GPU.
# Scripts started by the tests inherit this. CUDA-only tests are marked `cuda` and run by `make test-gpu`.
os.environ["DS_ACCELERATOR"] = "cpu"
# Set in this process by the in-process DeepSpeed tests; a script started by a test must not inherit them.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_python(*argv, stdin: str = "", cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a script (train.py, a tool, a benchmark) in a fresh interpreter, from the repository root."""
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return subprocess.run([sys.executable, *map(str, argv)], input=stdin, cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (make test-gpu); skipped without one")


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


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(seed=0, **config overrides) -> GPTNeoX in eval mode."""
    return random_model


@pytest.fixture
def checkpoint_writer():
    """write_hf_checkpoint(directory, config_json, state_dict, fmt="safetensors"|"bin", num_shards=1)."""
    return write_hf_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(fmt=..., num_shards=..., **config overrides) -> (directory, model)."""
    counter = iter(range(1000))

    def make(fmt: str = "safetensors", num_shards: int = 1, seed: int = 0, **overrides):
        model = random_model(seed, **overrides)
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("embed_out.weight")
        directory = write_hf_checkpoint(tmp_path / f"ckpt{next(counter)}", model.config.to_hf(), state, fmt, num_shards)
        return directory, model

    return make
