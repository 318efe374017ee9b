"""Stop requests at other moments than a step boundary, on real runs of the tiny config: the launcher dying
while two ranks are still starting, SIGHUP in the middle of an accumulated step, and more signals while a
stop is being honoured."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest

from gptneox.training import loss as losses
from gptneox.training.checkpoint import POINTER, CheckpointManager, tag_for
from gptneox.training.distributed import free_port
from gptneox.training.output_dir import LOCK_NAME, previous_run
from gptneox.training.stop import STOPPED_EXIT

from tests.helpers import LAUNCH_VARIABLES, REPO
from tests.training.runs import read_metrics, run_train, script_argv

# Each rank runs train.py through this: at MOMENT (a function of the start-up: reading the data, or
# deepspeed.initialize) it leaves a marker and waits, so that the test can act while every rank is there.
# With RANK0_ONLY, rank 1 goes on into the function and waits in its collectives for rank 0, and checks its
# launcher only every 10 minutes: it learns of the stop from its collective failing when rank 0 leaves. Each
# rank's exit status goes to its own file, not into interleaved output.
RANK = """
import os, runpy, sys, time
import deepspeed
from gptneox.training import loop, stop
status_dir, moment = os.environ["STATUS_DIR"], os.environ["MOMENT"]
if os.environ["RANK"] == "1" and os.environ.get("RANK0_ONLY"):
    stop.WATCH_INTERVAL_S = 600
module = deepspeed if moment == "initialize" else loop
real = getattr(module, moment)
def waiting(*args, **kwargs):
    open(os.path.join(status_dir, f"rank{os.environ['RANK']}.waiting"), "w").close()
    if os.environ["RANK"] == "0" or not os.environ.get("RANK0_ONLY"):
        time.sleep(600)
    return real(*args, **kwargs)
setattr(module, moment, waiting)
code = 1
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as stop:
    code = stop.code
finally:
    open(os.path.join(status_dir, f"rank{os.environ['RANK']}.status"), "w").write(str(code))
sys.exit(code)
"""


def test_the_launcher_watch_is_read_before_torch_is_imported():
    """gptneox/train.py imports gptneox.training.stop first, which reads the launcher links at import: any
    torch import on that path would delay it by seconds, in which a launcher's death goes unseen."""
    check = "import sys, gptneox.training.stop; print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "[]", run.stderr
    command = (REPO / "gptneox" / "train.py").read_text()
    assert command.index("from gptneox.training.stop import") < command.index("from gptneox.training import noise")


def _wait_for(paths, process, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(what)
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("moment, killed, rank0_only", [("load_run_datasets", "deepspeed command", ""),
                                                       ("initialize", "per-node launcher", ""),
                                                       ("initialize", "deepspeed command", "1")])
def test_a_launcher_gone_while_the_ranks_start_ends_them_without_a_checkpoint(workspace, tmp_path, moment, killed,
                                                                             rank0_only):
    """SIGTERM to the `deepspeed` command (which dies at once, forwarding nothing) or to the per-node launcher
    (which forwards it to the ranks) while both ranks are still reading data or inside deepspeed.initialize
    (or one waits there in a collective for the other, which leaves first): both exit 75 at once, nothing
    saved, the lock released, and the same command can go on in the directory."""
    out = tmp_path / "run"
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK)
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environment.update(STATUS_DIR=str(tmp_path), MOMENT=moment, RANK0_ONLY=rank0_only)
    argv = script_argv(workspace, out, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "100",
                        "--per_device_train_batch_size", "1")[1:]
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
               str(wrapper), *argv]
    runner = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for([tmp_path / f"rank{r}.waiting" for r in range(2)], runner, 400, "the ranks did not start")
    target = runner if killed == "deepspeed command" else psutil.Process(runner.pid).children()[0]
    target.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _wait_for([tmp_path / f"rank{r}.status" for r in range(2)], runner, 120,
              "the ranks went on after their launcher was gone")
    stopped_within = time.monotonic() - signalled
    runner.wait(timeout=60)
    assert [(tmp_path / f"rank{r}.status").read_text() for r in range(2)] == [str(STOPPED_EXIT)] * 2
    assert stopped_within < 30, stopped_within  # inside the per-node launcher's grace, not killed by it
    assert not (out / LOCK_NAME).exists()
    assert not list(out.glob("checkpoints/step*")) and previous_run(out) == []
    assert run_train(workspace, out, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "100") == 0


# A rank whose main thread cannot run a signal handler (as in a C call that never returns to Python): it
# blocks SIGTERM, so the launcher watch's interruption stays pending, and waits while reading the data.
STUCK_RANK = """
import os, runpy, signal, sys, time
from gptneox.training import loop, stop
stop.START_STOP_GRACE_S = 5.0
def stuck(*args, **kwargs):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    open(os.environ["MARKER"] + ".part", "w").write(str(os.getpid()))
    os.rename(os.environ["MARKER"] + ".part", os.environ["MARKER"])
    time.sleep(600)
loop.load_run_datasets = stuck
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_rank_that_cannot_be_interrupted_leaves_by_itself_once_its_launcher_is_gone(workspace, tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "rank0.pid"
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(STUCK_RANK)
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environment["MARKER"] = str(marker)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
               str(wrapper), *script_argv(workspace, out, "--max_steps", "2")[1:]]
    runner = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for([marker], runner, 400, "the rank did not start")
    rank = psutil.Process(int(marker.read_text()))
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=60)
    try:
        rank.wait(timeout=120)  # the watch's grace is 5 s here (60 s in a real run)
    except psutil.TimeoutExpired:
        os.killpg(runner.pid, signal.SIGKILL)
        pytest.fail("a rank stuck before its first step outlived its launcher")
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)  # the per-node launcher, if still there
        except ProcessLookupError:
            pass
    assert run_train(workspace, out, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "100") == 0


@pytest.mark.slow
def test_a_terminal_that_hangs_up_stops_the_run_after_a_save(workspace, tmp_path):
    """The run's terminal goes away (an ssh session drops): SIGHUP, and every later write to it fails. The
    run saves and exits 75 all the same."""
    out = tmp_path / "run"
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    argv = [sys.executable, *script_argv(workspace, out, "--max_steps", "5000", "--save_steps", "100000",
                                          "--eval_steps", "100000")]
    pid, terminal = pty.fork()
    if pid == 0:  # the run, with the pty as its controlling terminal, stdout and stderr
        os.chdir(REPO)
        os.execve(sys.executable, argv, environment)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert time.monotonic() < deadline, "training did not start"
            if select.select([terminal], [], [], 0.2)[0]:
                os.read(terminal, 65536)  # what the run shows, read so that it never blocks writing
    finally:
        os.close(terminal)  # the hang-up
    deadline = time.monotonic() + 120
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the run went on after its terminal hung up")
        time.sleep(0.2)
    assert os.waitstatus_to_exitcode(status[1]) == STOPPED_EXIT
    last_step = read_metrics(out)[-1]["step"]
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(last_step)


SIGNAL_AT_MICRO_BATCH = 10  # the 2nd of step 3's 4 micro-batches
MID_STEP = ("--max_steps", "4", "--gradient_accumulation_steps", "4", "--save_steps", "100", "--eval_steps", "100")


def test_sighup_in_the_middle_of_a_step_abandons_it_and_the_resume_is_exact(workspace, tmp_path, monkeypatch,
                                                                              capsys):
    straight = tmp_path / "straight"
    assert run_train(workspace, straight, *MID_STEP) == 0
    expected = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(straight) if "loss" in r]

    real_loss, calls = losses.batch_loss, []

    def hung_up_at_a_micro_batch(engine, batch):
        calls.append(engine.global_steps)
        if len(calls) == SIGNAL_AT_MICRO_BATCH:
            os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes
        return real_loss(engine, batch)

    monkeypatch.setattr(losses, "batch_loss", hung_up_at_a_micro_batch)
    out = tmp_path / "stopped"
    assert run_train(workspace, out, *MID_STEP) == STOPPED_EXIT
    assert "SIGHUP: saved, exiting (resume with --resume)" in capsys.readouterr().out
    assert len(calls) == SIGNAL_AT_MICRO_BATCH  # step 3's last two micro-batches were not run
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(2)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

    monkeypatch.setattr(losses, "batch_loss", real_loss)
    assert run_train(workspace, out, *MID_STEP, "--resume") == 0
    resumed = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(out) if "loss" in r]
    assert resumed == expected  # steps 1-2 of the first part, 3-4 of the resume: identical


def test_a_stop_inside_the_first_step_saves_nothing_and_the_same_command_goes_on(workspace, tmp_path, monkeypatch,
                                                                                 capsys):
    real_loss, calls = losses.batch_loss, []

    def hung_up_in_the_first_step(engine, batch):
        calls.append(engine.global_steps)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGHUP)
        return real_loss(engine, batch)

    monkeypatch.setattr(losses, "batch_loss", hung_up_in_the_first_step)
    out = tmp_path / "run"
    assert run_train(workspace, out, *MID_STEP) == STOPPED_EXIT
    assert "SIGHUP in the first step: nothing to save, exiting (run the same command again)" in capsys.readouterr().out
    assert calls == [0, 0] and not list(out.glob("checkpoints/step*")) and previous_run(out) == []
    monkeypatch.setattr(losses, "batch_loss", real_loss)
    assert run_train(workspace, out, *MID_STEP) == 0


# A single process stopped by SIGTERM at its 3rd step boundary, then signalled again while it saves (SIGTERM,
# SIGINT), while it releases the lock after the save, and as the interpreter exits (SIGHUP, SIGINT, SIGTERM).
SIGNALLED_AGAIN = """
import atexit, os, runpy, signal, sys, time
from gptneox.training import loop
from gptneox.training.checkpoint import CheckpointManager
from gptneox.training.output_dir import RunLock

def kill(*signals):
    for sig in signals:
        os.kill(os.getpid(), sig)
        time.sleep(0.2)  # each one handled on its own

real_step, real_write, real_release = loop.train_step, CheckpointManager.write, RunLock.release
def step(engine, micro_batches, **options):
    if engine.global_steps == 2:
        kill(signal.SIGTERM)
    return real_step(engine, micro_batches, **options)
def write(*args, **kwargs):
    kill(signal.SIGTERM, signal.SIGINT)
    return real_write(*args, **kwargs)
def release(lock):
    kill(signal.SIGTERM)
    return real_release(lock)
loop.train_step, CheckpointManager.write, RunLock.release = step, write, release
atexit.register(kill, signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
sys.argv = sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_more_signals_while_a_stop_is_honoured_change_nothing(workspace, tmp_path):
    out = tmp_path / "run"
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    run = subprocess.run([sys.executable, "-c", SIGNALLED_AGAIN,
                          *script_argv(workspace, out, "--max_steps", "100", "--save_steps", "100",
                                        "--eval_steps", "100")],
                         cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == STOPPED_EXIT, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr
    assert "SIGTERM, SIGINT, SIGTERM while stopping: ignored (SIGKILL ends a rank at once)" in run.stderr
    pointer = json.loads((out / "checkpoints" / POINTER).read_text())
    assert pointer["latest"] == tag_for(3) and pointer["complete"] == [tag_for(3)]
    assert CheckpointManager(out / "checkpoints", 2, 0).usable_tag() == tag_for(3)  # whole, by its run.json
    assert not (out / LOCK_NAME).exists()
