"""The `workspace` fixture of the training tests (tests/training/runs.py has what uses it)."""
from __future__ import annotations

import json

import pytest

from gptneox.training.distributed import init_distributed

from tests.training.runs import SAMPLE, SAMPLE_DATASETS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The bundled tokenizer, a data section over the bundled sample files; the process group (world 1)."""
    root = tmp_path_factory.mktemp("training")
    tokenizer = SAMPLE / "tokenizer.json"
    (root / "mix.yaml").write_text(json.dumps({"mix": {"datasets": SAMPLE_DATASETS}}))
    init_distributed()
    return root, tokenizer
