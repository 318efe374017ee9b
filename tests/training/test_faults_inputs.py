"""Faults that come with the inputs, each on a real run of the tiny config: a resume with another tokenizer
or other settings, a checkpoint that carries code, a run whose numbers go non-finite, and a model directory
whose config.json does not fit its weights."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from torch.serialization import get_unsafe_globals_in_checkpoint

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.cli import export_hf
from gptneox.errors import invoked_name
from gptneox.training.checkpoint import POINTER, tag_for
from gptneox.training.config import TrainConfigError
from gptneox.training.distributed import free_port
from gptneox.training.model_setup import check_model_fits
from gptneox.training.resume_check import RUN_RECORD
from gptneox.training.safe_checkpoint import check_no_code
from gptneox.weights import CheckpointError

from tests.helpers import LAUNCH_VARIABLES, REPO
from tests.training.runs import SAMPLE, read_metrics, run_train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    """--datasets for 10 alpaca records: 8 train (2 steps of 4 per epoch), 2 evaluate."""
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Count to {n}.", "input": "",
                                        "output": " ".join(map(str, range(1, n + 2)))}) + "\n" for n in range(10)))
    return json.dumps([{"alpaca": {"input_file_path": str(path), "val_split": 0.2}}])


def snapshot(directory: Path) -> dict:
    """Every file's bytes and modification time, and every directory's listing."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else sorted(os.listdir(p))
            for p in [directory, *directory.rglob("*")]}


def swapped_tokenizer(directory: Path) -> tuple[Path, str, int]:
    """The bundled tokenizer with two ids swapped (the same size, other ids): its file, one swapped token and
    that token's new id."""
    data = json.loads((SAMPLE / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = directory / "other.json"
    other.write_text(json.dumps(data))
    return other, a, vocab[a]


def test_a_resume_with_another_tokenizer_is_refused_and_rewrites_nothing(workspace, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(workspace, out, "--datasets", small_data, "--max_steps", "2", "--save_steps", "1") == 0
    other, token, new_id = swapped_tokenizer(tmp_path)
    pointer = out / "checkpoints" / POINTER  # a listed tag that is gone: passed over, and still listed after
    pointer.write_text(json.dumps({"latest": tag_for(9), "complete": [tag_for(1), tag_for(2), tag_for(9)]}))
    before = snapshot(out / "checkpoints")
    capsys.readouterr()
    assert run_train(workspace, out, "--datasets", small_data, "--max_steps", "2", "--save_steps", "1",
                     "--resume", "--tokenizer_path", str(other)) == 2
    error = capsys.readouterr().err.split("the newest complete checkpoint\n")[-1]  # after the warnings
    saved = out / "checkpoints" / "model" / "tokenizer.json"
    assert error.count("\n") == 1 and error.startswith(
        f"{invoked_name()}: error: resume: {out / 'checkpoints' / tag_for(2)} was written with tokenizer=")
    assert f"({saved}), this run has tokenizer=" in error and f"({other}); tokenizer cannot change" in error
    assert snapshot(out / "checkpoints") == before  # not a byte, not a timestamp
    assert json.loads(saved.read_text())["model"]["vocab"][token] != new_id  # still the checkpoint's own


@pytest.mark.slow
def test_two_ranks_refuse_a_resume_with_another_tokenizer_and_rewrite_nothing(workspace, small_data, tmp_path):
    """The same refusal under the launcher: both ranks refuse in one line before DeepSpeed starts (neither
    waits in a collective for the other), the launcher ends with exit 2, and nothing of the checkpoints changes."""
    out = tmp_path / "run"
    assert run_train(workspace, out, "--datasets", small_data, "--max_steps", "2", "--save_steps", "1") == 0
    other, _, _ = swapped_tokenizer(tmp_path)
    before = snapshot(out / "checkpoints")
    root, _ = workspace
    logs = tmp_path / "ranks"  # each rank's own output: two processes' lines are never parsed interleaved
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                "--enable_each_rank_log", str(logs)]
    argv = ["train.py", "--configs", "defaults", "tiny", str(root / "mix.yaml"), "--datasets", small_data,
            "--tokenizer_path", str(other), "--output_dir", str(out), "--max_length", "64", "--eval_size", "4",
            "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",  # the same global batch
            "--max_steps", "2", "--save_steps", "1", "--resume"]
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    run = subprocess.run(launcher + argv, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    # one line from each rank; the world size differs too (1 rank wrote it), and one line lists both
    rank_logs = sorted(logs.glob("*_rank*.log"))
    assert [log.name.rsplit("_", 1)[-1] for log in rank_logs] == ["rank0.log", "rank1.log"], rank_logs
    for log in rank_logs:
        refusals = [line for line in log.read_text().splitlines() if line.startswith("train.py: error: resume:")]
        assert len(refusals) == 1, log.read_text()[-3000:]
        assert "this run has tokenizer=" in refusals[0] and f"({other})" in refusals[0]
        assert refusals[0].endswith("tokenizer, world_size cannot change across a resume"), refusals[0]
    assert snapshot(out / "checkpoints") == before


def test_one_more_epoch_is_refused_once_with_every_difference_then_accepted(workspace, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ("--datasets", small_data, "--save_steps", "100")
    assert run_train(workspace, out, *common, "--num_train_epochs", "1") == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
    capsys.readouterr()
    assert run_train(workspace, out, *common, "--num_train_epochs", "2", "--resume") == 2
    assert capsys.readouterr().err == (
        f"{invoked_name()}: error: resume: {out / 'checkpoints' / tag_for(2)} was written with total_steps=2, "
        "num_train_epochs=1.0, this run has total_steps=4, num_train_epochs=2.0; pass --allow_changed "
        "total_steps,num_train_epochs if that is intended\n")
    assert run_train(workspace, out, *common, "--num_train_epochs", "2", "--resume",
                     "--allow_changed", "total_steps,num_train_epochs") == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(4)


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_non_finite_step_stops_with_exit_3_keeping_the_last_good_checkpoint(workspace, tmp_path, monkeypatch,
                                                                              capsys, dtype):
    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: True)
    out = tmp_path / "run"
    # a learning rate no one should use: the first update sends the weights far out, the next loss overflows
    status = run_train(workspace, out, "--max_steps", "6", "--save_steps", "1", "--warmup_steps", "1",
                       "--learning_rate", "1e30", "--dtype", dtype)
    error = capsys.readouterr().err.splitlines()[-1]
    assert status == 3, error
    records = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    bad = records[-1]["step"]
    assert bad < 6 and records[-1]["loss"] is None  # null, not NaN
    assert error.startswith(f"{invoked_name()}: stopped: step {bad}: loss ") and f" in {dtype} training; nothing of " \
        "this step was saved, the newest checkpoint is " in error and "fp16" not in error
    assert error.endswith(f"{out / 'checkpoints' / tag_for(bad - 1)} (lower learning_rate or check the data, "
                          "then --resume)")
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(bad - 1)
    assert not (out / "checkpoints" / tag_for(bad)).exists() and not list(out.glob("*.safetensors"))


class Payload:
    """What someone else's checkpoint could carry: unpickling it runs code (here: writes `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("dtype, scaler", [("fp16", "DynamicLossScaler"), ("bf16", "LossScaler")])
def test_deepspeed_checkpoints_pass_with_the_types_they_need(workspace, tmp_path, monkeypatch, dtype, scaler):
    """The fp32 and ZeRO-3 checkpoints pass in the other tests' resumes and exports; fp16 and bf16 here."""
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)  # DeepSpeed asks for AVX512-FP16
    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: True)
    out = tmp_path / dtype
    assert run_train(workspace, out, "--dtype", dtype, "--max_steps", "1", "--eval_steps", "100") == 0  # exported
    tag = out / "checkpoints" / tag_for(1)
    needed = set().union(*(get_unsafe_globals_in_checkpoint(path) for path in tag.glob("*.pt")))
    assert f"deepspeed.runtime.fp16.loss_scaler.{scaler}" in needed  # torch's own list refuses it
    check_no_code(tag)


def test_a_checkpoint_carrying_code_is_refused_by_resume_and_export_unless_trusted(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(workspace, out, "--max_steps", "2", "--save_steps", "1", "--eval_steps", "100") == 0
    tag_dir = out / "checkpoints" / tag_for(2)
    planted = tag_dir / "mp_rank_00_model_states.pt"
    marker = tmp_path / "code-ran"
    states = torch.load(planted, weights_only=False)  # our own file, just written
    states["note"] = Payload(marker)
    torch.save(states, planted)
    record = json.loads((tag_dir / RUN_RECORD).read_text())  # sizes as run.json records them, so the tag
    record["files"][planted.name] = planted.stat().st_size   # is whole and the payload is what stops it
    (tag_dir / RUN_RECORD).write_text(json.dumps(record))
    capsys.readouterr()

    resume = ("--max_steps", "3", "--save_steps", "1", "--eval_steps", "100", "--resume",
              "--allow_changed", "total_steps")
    assert run_train(workspace, out, *resume) == 2
    error = capsys.readouterr().err
    assert error == (f"{invoked_name()}: error: {planted}: refused to load: it needs builtins.exec, which no DeepSpeed "
                     "checkpoint holds; code in a checkpoint file runs when it is loaded; if you trust whoever wrote "
                     "it, pass --trust_checkpoint_code true\n")
    assert export_hf.main([str(out / "checkpoints"), str(tmp_path / "export")]) == 2
    assert f"{planted}: refused to load: it needs builtins.exec" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "export" / "model.safetensors").exists()

    # the opt-in: the user trusts this checkpoint, so its code runs
    assert export_hf.main([str(out / "checkpoints"), str(tmp_path / "export"), "--trust_checkpoint_code"]) == 0
    assert marker.read_text() == "ran" and (tmp_path / "export" / "model.safetensors").is_file()
    marker.unlink()
    assert run_train(workspace, out, *resume, "--trust_checkpoint_code", "true") == 0
    assert marker.read_text() == "ran" and [r["step"] for r in read_metrics(out) if "loss" in r][-1] == 3


def test_a_tampered_pointer_and_run_json_are_passed_over_and_nothing_outside_is_loaded_or_deleted(
        workspace, small_data, tmp_path, capsys):
    """checkpoints.json pointing outside the checkpoints (a copy of a real tag there, loadable if followed) and
    the newest tag's run.json turned into a JSON list: resume warns about both and goes on from the newest
    whole tag; rotation deletes neither the outside copy nor anything but tags; export refuses a --tag path,
    an output that is a file and one inside the checkpoints, each in one line, writing nothing."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    assert run_train(workspace, out, "--datasets", small_data, "--max_steps", "4", "--save_steps", "1") == 0
    evil = tmp_path / "evil"
    shutil.copytree(checkpoints / tag_for(3), evil)
    (checkpoints / POINTER).write_text(json.dumps({"latest": "../../evil", "complete": ["../../evil"]}))
    (checkpoints / tag_for(4) / RUN_RECORD).write_text("[1]")
    outside = snapshot(evil)
    capsys.readouterr()
    assert run_train(workspace, out, "--datasets", small_data, "--max_steps", "6", "--save_steps", "1",
                     "--save_total_limit", "2", "--resume", "--allow_changed", "total_steps") == 0
    printed = capsys.readouterr()
    assert (f"{checkpoints / POINTER}: unreadable checkpoint pointer ('complete' holds '../../evil', not a tag name "
            f"like step00000000); looking at the tags themselves ({', '.join(map(tag_for, (3, 4)))})"
            in printed.err)
    assert (f"warning: checkpoint {tag_for(4)} is damaged ({checkpoints / tag_for(4) / RUN_RECORD}: unreadable "
            "(a JSON list, not an object)); it is not used") in printed.err
    assert f"resumed from {tag_for(3)} (epoch 1, step 3)" in printed.out
    assert [r["step"] for r in read_metrics(out) if "loss" in r][-3:] == [4, 5, 6]
    assert json.loads((checkpoints / POINTER).read_text())["complete"] == [tag_for(5), tag_for(6)]
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step")) == [tag_for(5), tag_for(6)]
    assert snapshot(evil) == outside

    inside = snapshot(checkpoints)
    (tmp_path / "a-file").write_text("mine")
    for target, argv, error in [
        (tmp_path / "export", ["--tag", f"../../evil/{tag_for(5)}"],
         f"--tag ../../evil/{tag_for(5)}: not a checkpoint tag name like step00000040 (one of the step* directories "
         f"in {checkpoints})"),
        (tmp_path / "a-file", [], f"{tmp_path / 'a-file'}: the export's output directory is a file"),
        (checkpoints, [], f"{checkpoints}: the export's output directory is in the checkpoint directory "
                          f"{checkpoints}; write it elsewhere (train.py exports into the run's output_dir)"),
        (checkpoints / "model" / "hf", [], f"{checkpoints / 'model' / 'hf'}: the export's output directory is in"),
    ]:
        assert export_hf.main([str(checkpoints), str(target), *argv]) == 2
        message = capsys.readouterr().err
        assert f": error: {error}" in message and message.count("\n") == 1, message
    assert snapshot(checkpoints) == inside and (tmp_path / "a-file").read_text() == "mine"
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 2**30, "num_attention_heads": 8},
     "hidden_size=1073741824, but gpt_neox.embed_in.weight in model.safetensors is [96, 48] (hidden_size 48)"),
    ({"num_hidden_layers": 10**7}, "num_hidden_layers=10000000, but the weights (model.safetensors) hold 2 layers"),
    ({"intermediate_size": 2**31}, "intermediate_size=2147483648, but gpt_neox.layers.0.mlp.dense_h_to_4h.weight "
                                   "in model.safetensors is [96, 48] (intermediate_size 96)"),
])
def test_a_config_json_that_does_not_fit_its_weights_is_refused_before_building(workspace, tiny_checkpoint, tmp_path,
                                                                                capsys, change, message):
    directory, _ = tiny_checkpoint()
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    assert run_train(workspace, tmp_path / "run", "--model_name", str(directory)) == 2
    assert capsys.readouterr().err == f"{invoked_name()}: error: {directory / 'config.json'}: {message}\n"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        GPTNeoX.from_pretrained(directory)  # the library's loader checks the same, before building a layer


def test_a_model_whose_weights_alone_outgrow_the_memory_is_refused():
    config = GPTNeoXConfig.from_name("gpt-neox-20b")
    with pytest.raises(TrainConfigError, match=r"^model hidden_size=6144, num_hidden_layers=44, intermediate_size="
                                               r"24576, vocab_size=50432: 20,55\d,\d{3},\d{3} parameters, 82.\d GB in "
                                               r"fp32 for the weights alone, more than a test's 64.0 GB$"):
        check_model_fits(config, "fp32", 1, (64 * 10**9, "a test's"))
    check_model_fits(config, "fp16", 1, (64 * 10**9, "a test's"))  # 41 GB: fits
    with pytest.raises(TrainConfigError, match="20.6 GB in fp16 per rank of 2 for the weights alone, more than a test.s 20.0 GB"):
        check_model_fits(config, "fp16", 2, (80 * 10**9 // 4, "a test's"))
