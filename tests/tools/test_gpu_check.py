"""bench/gpu_check.sh, the one-shot GPU check, is ready before a GPU is: valid bash, --help, a step budget that
fits the lease, its CPU-runnable steps (parity, loss, layers, decode, fp16 train with an injected overflow,
resume, export) passing on tiny CPU shapes, and an offline carry (bench/prepare_gpu_wheels.sh) under its
size limit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
    assert "bench/prepare_gpu_wheels.sh" in shown.stdout  # how to prepare the offline wheels
    assert "pip install --pre flash-attn-4" in shown.stdout
    missing = run()
    assert missing.returncode == 2 and "OUT_DIR is required" in missing.stderr
    assert run("out", "--gpus").returncode == 2


def test_step_limits_add_up_to_eight_minutes():
    """The lease gives ten minutes a command: the steps' limits leave room for the machine's own start-up."""
    shown = run("--budget")
    limits = dict(line.split() for line in shown.stdout.splitlines())
    assert set(limits) == {"install", "tests", "parity", "loss", "layers", "decode", "train", "resume", "total"}
    assert int(limits.pop("total")) == sum(map(int, limits.values())) <= 8 * 60
    script = SCRIPT.read_text()
    assert "timeout 30 " not in script and "timeout 120 " not in script  # every step runs under its LIMIT


@pytest.mark.slow
def test_cpu_run_of_every_cpu_runnable_step(tmp_path):
    result = run(tmp_path / "check", "--cpu", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "check" / "summary.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == {"parity", "loss", "layers", "decode", "train", "resume"}, table
    assert all("| PASS |" in row for row in rows.values()), table
    # fp16 through DeepSpeed's loss scaler: the overflow at steps 4 and 5 is skipped, the scale halves after
    # the hysteresis of 2 (ds_config.json), step 6 trains, and the resume from step 3 replays all of it exactly
    assert "identical at steps [4, 5, 6]" in rows["resume"] and "export loads: True" in rows["resume"]
    assert "skipped [4, 5], loss scale 65536 -> 65536 -> 65536 -> 65536 -> 32768 -> 32768" in rows["resume"]
    assert "float16 loss rel" in rows["loss"]
    assert "sdpa" in rows["layers"] and "tok/s" in rows["layers"]
    assert table in result.stdout  # the one table is what the script prints
    assert (tmp_path / "check" / "parity.json").is_file() and (tmp_path / "check" / "train.log").is_file()


PREPARE = REPO / "bench" / "prepare_gpu_wheels.sh"


def test_wheel_carry_size_check(tmp_path):
    """The size check of the carry, offline: a folder under the limit passes and lists its total, one over it
    fails, and a torch wheel (gigabytes with its CUDA libraries; the image has its own) is refused."""
    assert subprocess.run(["bash", "-n", str(PREPARE)]).returncode == 0
    assert "pip wheel --no-deps" in subprocess.run(["bash", str(PREPARE), "--help"], capture_output=True,
                                                   text=True).stdout
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "hjson-3.1.0-py3-none-any.whl").write_bytes(b"x" * 1000)
    (wheels / "deepspeed-0.19.8-py3-none-any.whl").write_bytes(b"x" * (2 << 20))
    check = lambda limit: subprocess.run(["bash", str(PREPARE), str(wheels), "--size-only"], capture_output=True,  # noqa: E731
                                         text=True, env={**os.environ, "GPU_WHEELS_LIMIT_MIB": str(limit)})
    fits = check(48)
    assert fits.returncode == 0 and "2 wheels, 2098152 bytes (3 MiB)" in fits.stdout, fits.stdout + fits.stderr
    over = check(2)
    assert over.returncode == 1 and "over 2 MiB" in over.stderr
    (wheels / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    assert "torch/CUDA wheel" in check(48).stderr


def test_install_keeps_what_the_image_has(tmp_path):
    """A package already installed is kept and reported, whatever its version; nothing is fetched."""
    (tmp_path / "pytest-1.0.0-py3-none-any.whl").write_bytes(b"not a wheel: never opened")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "install_wheels.py"), str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("found pytest ") and "(kept)" in result.stdout
