"""Output-directory rules: another run's records are refused unless --resume or --overwrite_output_dir says
what to do with them, a live run's lock keeps a second one out, a dead run's lock is taken over, and an
unwritable directory is refused before anything starts."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from gptneox.training.output_dir import (LOCK_NAME, OutputDirError, check_writable, claim_output_dir,
                                         previous_run)

from tests.helpers import REPO

HOLD_LOCK = "import sys; from gptneox.training.output_dir import RunLock; lock = RunLock.acquire(sys.argv[1]); " \
            "print('held', flush=True); sys.stdin.read()"


def fake_run(directory):
    """What a finished run leaves: checkpoints, metrics, its config and the exported model."""
    (directory / "checkpoints" / "step00000004").mkdir(parents=True)
    (directory / "checkpoints" / "checkpoints.json").write_text('{"latest": "step00000004"}')
    (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (directory / "train_config.yaml").write_text("train: {}\n")
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "config.json").write_text("{}")


def test_another_runs_records_are_refused_naming_both_flags(tmp_path):
    fake_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="holds another run \\(checkpoints, metrics.jsonl, train_config.yaml, "
                                             "model.safetensors\\): pass --resume .* --overwrite_output_dir"):
        claim_output_dir(tmp_path, resume=False, overwrite=False)
    assert not (tmp_path / LOCK_NAME).exists()  # the refused run leaves no lock behind
    claim_output_dir(tmp_path, resume=True, overwrite=False).release()
    assert (tmp_path / "metrics.jsonl").exists()
    claim_output_dir(tmp_path, resume=False, overwrite=True).release()
    assert previous_run(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(OutputDirError, match="choose one"):
        claim_output_dir(tmp_path, resume=True, overwrite=True)


def test_empty_or_unrelated_directory_is_fine(tmp_path):
    (tmp_path / "checkpoints").mkdir()  # created by a run that failed before writing anything
    claim_output_dir(tmp_path / "new" / "deep", resume=False, overwrite=False).release()
    claim_output_dir(tmp_path, resume=False, overwrite=False).release()


def test_a_live_runs_lock_keeps_a_second_run_out_and_a_dead_ones_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        expected = f"in use by pid {holder.pid} on host {socket.gethostname()} \\(started .*lock file"
        with pytest.raises(OutputDirError, match=expected):
            claim_output_dir(tmp_path, resume=False, overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # left behind by kill -9
    lock = claim_output_dir(tmp_path, resume=False, overwrite=False)
    assert lock.taken_over.startswith(f"pid {holder.pid} on host ")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory this process cannot write: a read-only mount when running as root (root ignores
    permission bits), a mode-555 directory otherwise."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"root without permission to mount a read-only tmpfs: {mounted.stderr.strip()}")
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


def test_read_only_output_directory_is_refused(read_only_directory):
    with pytest.raises(OutputDirError, match=f"output_dir {read_only_directory} is not writable \\("):
        claim_output_dir(read_only_directory, resume=False, overwrite=False)
    with pytest.raises(OutputDirError, match=f"log_dir {read_only_directory}/tb is not writable"):
        check_writable(read_only_directory / "tb", key="log_dir")


def test_a_run_that_fails_before_training_leaves_no_empty_directories(tmp_path, capsys):
    """A data error found after the output directory was claimed: the directories the run made (output_dir
    and log_dir, with their missing parents) go again; one that existed before stays."""
    from gptneox.train import main as train_main

    section = tmp_path / "broken.yaml"
    section.write_text("broken:\n  datasets:\n    - chat:\n        input_file_path: missing.jsonl\n")
    (tmp_path / "kept").mkdir()
    argv = ["--configs", "defaults", "tiny", str(section), "--tokenizer_path", str(REPO / "data/sample/tokenizer.json")]
    assert train_main([*argv, "--output_dir", str(tmp_path / "runs" / "one"),
                       "--log_dir", str(tmp_path / "logs" / "tb")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "kept"]
    assert train_main([*argv, "--output_dir", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())
