"""report_to: the Hugging Face Trainer's names and forms, an uninstalled backend refused when the config is read,
and the figures each backend really holds afterwards (TensorBoard's event file, W&B's offline run file)."""
from __future__ import annotations

import importlib
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from gptneox.train import main as train_main
from gptneox.training.config import TrainConfigError, parse_train_config
from gptneox.training.metrics import MetricsLogger, report_tag
from gptneox.training.reporting import requested_backends
from gptneox.training.step import StepResult

from tests.training.runs import run_train


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """W&B offline, writing only under tmp_path (its runs, settings and caches). The tests that read what the
    backends wrote need both installed (the test extra); a GPU image may have neither."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
        (tmp_path / "wandb-home" / name.lower()).mkdir(parents=True)
    for name in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "wandb-home" / "wandb_dir"


def wandb_records(wandb_dir: Path, timeout: float = 120) -> list:
    """The records of the one offline run under wandb_dir, once W&B's service has written them all (its
    closing `exit` record). `run.finish()` can return before the service has flushed the file: seen here
    once in about twenty runs, as a file cut at 4,097 bytes."""
    deadline = time.monotonic() + timeout
    while True:
        files = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
        records = read_wandb_file(files[0]) if len(files) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert len(files) == 1, files
            return records
        time.sleep(0.2)


def read_wandb_file(path: Path) -> list:
    """A run-ID.wandb file is a log of 32 KiB blocks after a 7-byte header, each record a 7-byte header
    (crc32, length, kind) and a protobuf Record, records that cross a block split into first, middle and last
    pieces. A record still being written (cut short) ends the list."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pieces, records = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if position + 7 + length > len(raw):
            break
        data = raw[position + 7:position + 7 + length]
        position += 7 + length
        pieces = data if kind in (1, 2) else pieces + data  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = importlib.import_module("wandb.proto.wandb_internal_pb2").Record()
            record.ParseFromString(pieces)
            records.append(record)
    return records


def wandb_history(records: list) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the history records (a key flat or split at its slashes), W&B's own _keys
    left out."""
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = row.get("_step", record.history.step.num)
            history.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return history


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_takes_the_trainers_names_and_forms(monkeypatch):
    assert requested_backends("none") == requested_backends(None) == requested_backends([]) == []
    assert requested_backends("wandb") == ["wandb"]
    assert requested_backends(["wandb", "tensorboard"]) == requested_backends("wandb, tensorboard") == [
        "tensorboard", "wandb"]
    assert requested_backends("all") == ["tensorboard", "wandb"]  # both are installed in the test environment
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    assert requested_backends("all") == ["tensorboard"]  # "all" is every installed one
    with pytest.raises(ValueError, match=r"unknown backend 'tensorbord'; did you mean 'tensorboard'\?"):
        requested_backends(["tensorbord"])
    assert parse_train_config(["--configs", "defaults", "tiny", "--report_to", "[tensorboard]"]).report_to == [
        "tensorboard"]


def test_a_backend_asked_for_and_not_installed_stops_the_run_before_anything_is_read(monkeypatch, capsys,
                                                                                    tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrainConfigError, match=r"report_to='tensorboard,wandb': wandb is not installed: "
                                               r"install gptneox's extra 'wandb' \(pip install 'gptneox\[wandb\]'; in a checkout pip install -e "
                                               r"'\.\[wandb\]'\); or leave it out of report_to"):
        parse_train_config(["--configs", "defaults", "tiny", "--report_to", "tensorboard,wandb"])
    status = train_main(["--configs", "defaults", "tiny", "sample-mix", "--output_dir", str(tmp_path / "run"),
                         "--report_to", "wandb"])
    captured = capsys.readouterr()
    assert status == 2 and len(captured.err.strip().splitlines()) == 1
    assert "error: report_to='wandb': wandb is not installed: install gptneox's extra 'wandb'" in captured.err
    assert "training conversations" not in captured.out and not (tmp_path / "run").exists()


def test_wandb_without_credentials_is_one_line_saying_what_to_do(workspace, tmp_path, wandb_offline, monkeypatch,
                                                                 capsys):
    """wandb installed but not logged in: wandb.init raises its UsageError (seen with online mode and no
    key); the run ends in one line with exit 2, not wandb's traceback."""
    import wandb

    def no_key(**settings):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_key)
    capsys.readouterr()
    assert run_train(workspace, tmp_path / "run", "--max_steps", "1", "--report_to", "wandb") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error: report_to wandb: No API key configured. Use `wandb login` to log in. (run `wandb login` or set " \
           "WANDB_API_KEY; WANDB_MODE=offline logs locally; or leave wandb out of report_to)" in err


def test_record_keys_become_grouped_tags():
    assert [report_tag(k) for k in ("loss", "lr", "grad_norm", "eval_vicuna_loss", "eval_code_alpaca_accuracy",
                                    "eval_loss", "eval_accuracy")] == [
        "train/loss", "train/learning_rate", "train/grad_norm", "eval/vicuna/loss", "eval/code_alpaca/accuracy",
        "eval/loss", "eval/accuracy"]  # all sets together: the Trainer's tags


def _step(loss: float, lr: float) -> StepResult:
    return StepResult(loss=loss, trained_tokens=100, tokens=200, flops=1e9, skipped=False, lr=lr, grad_norm=None,
                      loss_scale=1.0, skipped_steps=0)


def _log_two_steps(logger: MetricsLogger) -> None:
    logger.log_step(1, _step(2.5, 1e-4), seconds=0.5, epoch=0.1)
    logger.log_step(2, _step(2.0, 2e-4), seconds=0.5, epoch=0.2)
    logger.log_eval(2, {"eval_vicuna_loss": 3.0, "eval_vicuna_accuracy": 0.25})
    logger.close()


def test_tensorboard_and_wandb_hold_the_figures_of_metrics_jsonl(tmp_path, wandb_offline):
    out = tmp_path / "my-run"
    out.mkdir()
    logger = MetricsLogger(out, total_steps=2, initial_step=0, enabled=True, report_to=["tensorboard", "wandb"],
                           log_dir=tmp_path / "tb", run_config={"learning_rate": 2e-4, "model_name": "tiny"})
    _log_two_steps(logger)

    scalars = tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["train/learning_rate"] == [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]
    assert scalars["train/tokens_per_s"] == [(1, 400.0), (2, 400.0)]
    assert scalars["eval/vicuna/loss"] == [(2, 3.0)] and scalars["eval/vicuna/accuracy"] == [(2, 0.25)]
    assert "train/grad_norm" not in scalars and "train/mfu" not in scalars  # None: no figure, not a 0

    records = wandb_records(wandb_offline)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "my-run" and run.project == "gptneox"  # named after the output directory
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["learning_rate"] == 2e-4 and config["model_name"] == "tiny"
    history = wandb_history(records)
    assert history[1]["train/loss"] == 2.5 and history[2]["train/loss"] == 2.0
    assert history[2]["train/learning_rate"] == 2e-4 and history[2]["eval/vicuna/loss"] == 3.0
    assert set(history[2]) == {tag for tag, points in scalars.items() if points[-1][0] == 2}  # the same tags


def test_only_the_rank_that_writes_metrics_opens_backends(tmp_path, wandb_offline):
    logger = MetricsLogger(tmp_path, total_steps=2, initial_step=0, enabled=False,
                           report_to=["tensorboard", "wandb"], log_dir=tmp_path / "tb")
    _log_two_steps(logger)
    assert list(tmp_path.iterdir()) == [tmp_path / "wandb-home"] and not list(wandb_offline.iterdir())


@pytest.mark.slow
def test_a_training_run_reports_its_steps_to_both_backends(workspace, tmp_path, wandb_offline, monkeypatch):  # noqa: F811
    monkeypatch.setenv("WANDB_PROJECT", "sft-test")
    out = tmp_path / "run"
    assert run_train(workspace, out, "--max_steps", "2", "--eval_steps", "2", "--report_to", "all") == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in steps if "loss" in r]
    assert tensorboard_scalars(out / "tensorboard")["train/loss"] == [(s, pytest.approx(v)) for s, v in losses]
    records = wandb_records(wandb_offline)
    assert [r.run.project for r in records if r.WhichOneof("record_type") == "run"] == ["sft-test"]
    history = wandb_history(records)
    assert [(s, history[s]["train/loss"]) for s, _ in losses] == losses
    assert any(key.startswith("eval/") and key.endswith("/loss") for key in history[2])
    assert "eval/loss" in history[2] and "eval/loss" in tensorboard_scalars(out / "tensorboard")
