"""A real, non-editable `pip install .` into a fresh virtual environment, then the console commands from an
empty directory: train on the bundled sections, export, chat. Offline and quick: the new environment sees
this one's dependencies through a .pth file (not its editable gptneox), and pip builds without isolation."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gptneox.training.config import INPUT_PATH_KEYS, available_configs, load_section
from gptneox.training.distributed import environment_extensions_dir

from tests.helpers import LAUNCH_VARIABLES, REPO

# What a source distribution holds; the test installs from a copy so that the build leaves the checkout alone.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "ds_config.json", "ds_config_zero3.json",
           "ds_config_zero3_offload.json", "gptneox", "configs", "data")
# Every console command of [project.scripts], as gptneox-NAME.
COMMANDS = ("train", "chat", "export", "convert", "reference-logits", "plot", "sampling-report", "data-report",
            "plan-memory")


def test_every_file_a_bundled_section_names_is_in_the_package():
    """A bundled section's relative paths are taken from the package directory, so each file must be there
    (a link to the top-level copy in a checkout, package data in the wheel)."""
    named = {(name, key, section[key]) for name in available_configs()
             for section in [load_section(name)] for key in INPUT_PATH_KEYS if key in section}
    assert any(key == "deepspeed_config" and path.endswith("ds_config_zero3.json") for _, key, path in named)
    assert [entry for entry in named if not Path(entry[2]).exists()] == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ directory of a fresh environment with gptneox installed from a copy of the sources."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():  # the package's symlinks to configs/ and data/ stay symlinks
            shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "-q", str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv / "bin"


def run(command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # PYTHONPATH (a worktree's test command sets it) would put the checkout before the installed package
    environment = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARIABLES, "PYTHONPATH")}
    # the op this environment already built; a fresh environment would build its own (about a minute)
    environment["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(environment_extensions_dir())
    return subprocess.run(list(map(str, command)), cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_the_installed_package_is_not_the_checkout(installed, tmp_path):
    done = run([installed / "python", "-c", "import gptneox; print(gptneox.__file__); print(gptneox.__version__)"],
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    location, version = done.stdout.split()
    assert Path(location).is_relative_to(installed.parent) and version == __import__("gptneox").__version__
    assert sorted(p.name for p in installed.glob("gptneox-*")) == sorted(f"gptneox-{c}" for c in COMMANDS)
    for command in COMMANDS:
        done = run([installed / f"gptneox-{command}", "--help"], cwd=tmp_path)
        assert done.returncode == 0 and "usage:" in done.stdout, command + done.stderr[-2000:]


@pytest.mark.slow
def test_a_console_command_names_itself_in_a_user_error(installed, tmp_path):
    done = run([installed / "gptneox-export", tmp_path, tmp_path / "out"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("gptneox-export: error: "), done.stderr
    done = run([installed / "gptneox-train", "--configs", "no-such-section"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("gptneox-train: error: unknown config"), done.stderr
    done = run([installed / "gptneox-train", "--help"], cwd=tmp_path)
    assert done.stdout.startswith("usage: gptneox-train [--configs NAME"), done.stdout[:500]


@pytest.mark.slow
def test_plan_memory_reads_the_packaged_zero3_configs(installed, tmp_path):
    done = run([installed / "gptneox-plan-memory", "--model", "gpt-neox-20b", "--gpus", "8", "--gpu_memory_gb", "80",
                "--max_length", "2048", "--micro_batch", "2", "--dtype", "bf16"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ds_config: does not fit" in done.stdout and "ds_config_zero3_offload: fits" in done.stdout


@pytest.mark.slow
def test_train_export_and_chat_from_an_empty_directory(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    done = run([installed / "gptneox-train", "--configs", "defaults", "tiny", "sample-mix", "--output_dir", "OUT",
                "--max_steps", "3", "--eval_steps", "3"], cwd=work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "297 training conversations" in done.stdout + done.stderr
    assert (work / "OUT" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["OUT"]  # nothing written beside the run directory

    exported = run([installed / "gptneox-export", "OUT/checkpoints", "again"], cwd=work)
    assert exported.returncode == 0, exported.stderr
    assert (work / "again" / "model.safetensors").read_bytes() == (work / "OUT" / "model.safetensors").read_bytes()

    chat = run([installed / "gptneox-chat", "--model", "again", "--prompt", "What is a meme?", "--greedy",
                "--max_new_tokens", "5"], cwd=work)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def readme_block(heading: str) -> str:
    """The first ```sh block after `heading` in README.md."""
    text = (REPO / "README.md").read_text()
    after = text[text.index(heading):]
    return after[after.index("```sh\n") + len("```sh\n"):].split("\n```\n", 1)[0] + "\n"


@pytest.mark.slow
def test_the_readmes_own_chats_walk_through_runs_as_written(installed, tmp_path):
    """README's "Train on your own chats", run by bash in an empty directory with the installed commands first on
    PATH, as a user pastes it."""
    script = readme_block("## Train on your own chats")
    assert "gptneox-train --configs defaults tiny sample-tokenizer my-chats.yaml" in script
    environment = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARIABLES, "PYTHONPATH")}
    environment["PATH"] = f"{installed}:{os.environ['PATH']}"
    environment["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(environment_extensions_dir())
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "6 records read" in output and "5 train, 1 eval" in output  # the data report, then the run
    assert "20 steps" in output and "eval_loss" in output
    assert (tmp_path / "my-run" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chats.jsonl", "my-chats.yaml", "my-run"]
    assert done.stdout.strip().splitlines()[-1].strip()  # the chat answered (gibberish, as the README says)
