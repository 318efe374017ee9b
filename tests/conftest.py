"""Shared fixtures (the helpers behind them are in tests/helpers.py) and the `slow` marker."""
from __future__ import annotations

import os
import signal

import pytest

from tests.helpers import random_model, write_hf_checkpoint

# The suite is the CPU suite on every machine: DeepSpeed picks its CUDA accelerator whenever a GPU is visible
# (deepspeed/accelerator/real_accelerator.py), which would build FusedAdam and place the engines on the GPU.
# Scripts started by the tests inherit this. CUDA-only tests are marked `cuda` and run by `make test-gpu`.
os.environ["DS_ACCELERATOR"] = "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (make test-gpu); skipped without one")
    config.addinivalue_line("markers", "slow: end-to-end runs of train.py, the launcher, or a tool or script in a "
                                       "fresh interpreter (seconds to a minute each); `make test` runs them, "
                                       "`make test-fast` (pytest -m 'not slow') skips them")


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A run stopped in-process keeps its stop handlers, as a real command does up to its exit; the next test
    gets the handlers back that it would have had."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


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
