"""Every optional dependency that is missing is one line naming the pip extra to install, from the command
that needs it. Each case runs in its own interpreter with the module marked missing (sys.modules[name] =
None, which makes its import fail as if it were not installed)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

TRAIN = ["--configs", "defaults", "tiny", "sample-mix", "--max_steps", "1"]


# What gptneox.train runs first on a GPU machine (its accelerator's device name is "cuda"), as a command.
FLASH_ON_A_GPU = ("from gptneox.errors import run_command; from gptneox.training.config import parse_train_config; "
                  "from gptneox.training.model_setup import choose_attention_backend; "
                  "sys.exit(run_command('gptneox-train', lambda: choose_attention_backend(parse_train_config({argv!r}), "
                  "'cuda') and 0))")


def run_without(module: str, command: str, argv: list[str], cwd) -> subprocess.CompletedProcess:
    run = (FLASH_ON_A_GPU.format(argv=argv) if command == "flash on a GPU" else
           f"import importlib; sys.exit(importlib.import_module({command!r}).main({argv!r}))")
    script = f"import sys; sys.modules[{module!r}] = None; {run}"
    environment = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
                   "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("module, extra, command, argv", [
    ("matplotlib", "plot", "gptneox.cli.plot_metrics", ["metrics.jsonl"]),
    ("pyarrow", "data", "gptneox.cli.data_report", ["--configs", "defaults", "tiny", "sample-mix"]),
    ("tensorboard", "tensorboard", "gptneox.train", [*TRAIN, "--report_to", "tensorboard"]),
    ("wandb", "wandb", "gptneox.train", [*TRAIN, "--report_to", "wandb"]),
    ("flash_attn", "flash", "flash on a GPU", ["--configs", "defaults", "stablelm-7b"]),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path, module, extra, command, argv):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0, "lr": 1e-4}) + "\n")
    done = run_without(module, command, argv, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in lines if ": error: " in line]  # the data report logs its datasets before it
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"extra {extra!r}" in errors[0] and "not installed" in errors[0], errors[0]
    assert not (tmp_path / "out").exists()  # tiny's output_dir: nothing was made
