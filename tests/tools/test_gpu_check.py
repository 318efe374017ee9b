"""bench/gpu_check.sh, the one-shot GPU check, is ready before a GPU is: valid bash, --help, and its
CPU-runnable steps (parity, loss, layers, decode, train + resume + export) pass on tiny CPU shapes."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import LAUNCH_VARIABLES, REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def run(*args, timeout=60):
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environment["PYTHON"] = sys.executable
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def test_syntax_help_and_bad_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    shown = run("--help")
    assert shown.returncode == 0 and "usage: bench/gpu_check.sh OUT_DIR" in shown.stdout
    assert "pip download deepspeed" in shown.stdout  # how to prepare the offline wheels
    missing = run()
    assert missing.returncode == 2 and "OUT_DIR is required" in missing.stderr
    assert run("out", "--gpus").returncode == 2


def test_cpu_run_of_every_cpu_runnable_step(tmp_path):
    result = run(tmp_path / "check", "--cpu", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "check" / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"parity", "loss", "layers", "decode", "resume"}, table
    assert all("| PASS |" in row for row in rows.values()), table
    assert "identical at steps [3, 4]" in rows["resume"] and "export loads: True" in rows["resume"]
    assert "sdpa" in rows["layers"] and "tok/s" in rows["layers"]
    assert table in result.stdout  # the one table is what the script prints
    assert (tmp_path / "check" / "parity.json").is_file() and (tmp_path / "check" / "train.log").is_file()
