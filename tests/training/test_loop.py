"""The training loop against a real DeepSpeed engine, in this process (world size 1, CPU, fp32 unless noted):
exact token-mean loss under uneven accumulation, gradient checkpointing, resume, export, fp16 overflow."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import deepspeed
import pytest
import torch
import transformers
from deepspeed.accelerator import get_accelerator

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.chat import DEFAULT_SAMPLING, reply_stop_ids
from gptneox.data import DialogueCollator, load_tokenizer
from gptneox.data.tokenizer import CHAT_TEMPLATE
from gptneox.training import loss as losses
from gptneox.training.checkpoint import POINTER, CheckpointManager, tag_for
from gptneox.training.distributed import free_port
from gptneox.training.export import export_checkpoint, write_model_metadata
from gptneox.training import loop
from gptneox.training.step import train_step
from gptneox.training.config import TrainConfig
from gptneox.training.ds_config import resolve_ds_config
from gptneox.training.model_setup import parameter_groups
from gptneox.training.stop import STOPPED_EXIT

from tests.helpers import REPO
from tests.training.runs import SAMPLE, read_metrics, run_train, script_argv


# ------------------------------------------------------------------ exact loss under accumulation
def _sgd_engine(model, gas, micro):
    """Plain SGD with lr 1 and no clipping: the parameter change of one step is minus the gradient."""
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "train_batch_size": micro * gas, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
              "optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _batch(ids, trained):
    ids = torch.tensor([ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, trained] = True
    return {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": mask,
            "attention_mask": torch.ones_like(ids)}


def _gradient(model_factory, micro_batches, gas):
    model = model_factory()
    before = [p.detach().clone() for p in model.parameters()]
    engine = _sgd_engine(model, gas, micro=1 if gas > 1 else micro_batches[0]["input_ids"].shape[0])
    result = train_step(engine, micro_batches)
    return result.loss, [b - p.detach() for b, p in zip(before, engine.module.parameters())]


def test_uneven_micro_batches_give_the_gradient_of_one_batch(workspace):
    def model_factory():
        torch.manual_seed(0)
        return GPTNeoX(GPTNeoXConfig.from_name("tiny"))

    torch.manual_seed(1)
    a_ids, b_ids = torch.randint(0, 1024, (12,)).tolist(), torch.randint(0, 1024, (12,)).tolist()
    a, b = _batch(a_ids, [3]), _batch(b_ids, list(range(2, 11)))  # 1 and 9 trained tokens
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    loss_accumulated, grad_accumulated = _gradient(model_factory, [a, b], gas=2)
    loss_single, grad_single = _gradient(model_factory, [both], gas=1)

    model = model_factory()  # the definition: mean over all 10 trained tokens, plain autograd
    total, count = losses.masked_cross_entropy(model(both["input_ids"]), both["targets"], both["loss_mask"])
    (total / count).backward()
    assert loss_accumulated == pytest.approx((total / count).item(), rel=1e-5)
    assert loss_single == pytest.approx(loss_accumulated, rel=1e-5)
    for accumulated, single, p in zip(grad_accumulated, grad_single, model.parameters()):
        torch.testing.assert_close(accumulated, p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(single, p.grad, rtol=1e-4, atol=1e-6)
    # the reference's weighting (each micro-batch's own mean, averaged) gives a different loss here
    sums = [losses.masked_cross_entropy(model(x["input_ids"]), x["targets"], x["loss_mask"]) for x in (a, b)]
    per_micro_mean = sum(s.item() / n.item() for s, n in sums) / 2
    assert abs(per_micro_mean - loss_accumulated) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny")).train()
    batch = _batch(torch.randint(0, 1024, (20,)).tolist(), list(range(5, 19)))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        hidden = model(batch["input_ids"], return_hidden=True)
        total, _ = losses.masked_cross_entropy_from_hidden(hidden, model.output_embedding, batch["targets"],
                                                           batch["loss_mask"])
        total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


# ------------------------------------------------------------------ resume and export
@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_and_export_loads_in_transformers(workspace, tmp_path, capsys):
    straight = tmp_path / "straight"
    assert run_train(workspace, straight, "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4",
                     "--gradient_checkpointing", "true", "--save_total_limit", "3") == 0
    records = read_metrics(straight)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("lr", "grad_norm", "loss_scale", "skipped_steps", "tokens_per_s", "trained_tokens_per_s", "mfu",
                "peak_memory_gb"):
        assert steps[-1][key] is not None and steps[-1][key] >= 0, key
    assert [r["step"] for r in records if "eval_oasst_export_loss" in r] == [4, 8]
    assert steps[0]["lr"] == 0.0 and steps[1]["lr"] == 0.0 and steps[2]["lr"] > 0  # WarmupDecayLR's first two
    assert "auto" not in (straight / "ds_config.resolved.json").read_text()
    assert "gradient_checkpointing: true" in (straight / "train_config.yaml").read_text()

    # Resume from the step-4 checkpoint of the same run, as after a crash at step 8 that left a half-written
    # metrics line: steps 5..8 must come out identical, and metrics.jsonl reads as one uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    (resumed / "checkpoints" / POINTER).write_text(json.dumps({"latest": tag_for(4), "complete": [tag_for(4)]}))
    (resumed / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text() + '{"step": 9, "lo')
    capsys.readouterr()
    assert run_train(workspace, resumed, "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4",
                     "--gradient_checkpointing", "true", "--resume") == 0
    assert "metrics.jsonl: 6 record(s) after step 4 dropped" in capsys.readouterr().out  # 4 steps, 1 eval, 1 torn
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in records]  # each step once, evaluations included
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in again if "loss" in r] == \
           [(r["loss"], r["grad_norm"], r["lr"]) for r in steps]
    fewer = json.dumps([{"vicuna": {"input_file_path": str(SAMPLE / "vicuna_sample.json"), "val_split": 0.2}}])
    assert run_train(workspace, resumed, "--max_steps", "8", "--resume", "--datasets", fewer) == 2
    refused = capsys.readouterr().err  # checked before anything is loaded
    assert "was written with num_samples=221, dataset=" in refused and "this run has num_samples=32, dataset=" in refused
    assert "num_samples cannot change across a resume; --allow_changed dataset would accept the other" in refused

    # The final export: our loader and transformers agree on the logits.
    ours = GPTNeoX.from_pretrained(straight).eval()
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(straight).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    assert (straight / "tokenizer.json").is_file()


def test_export_keeps_tied_embeddings_tied_and_writes_the_chat_files(workspace, tmp_path, capfd):
    """The export builds its model on the meta device and assigns the checkpoint's tensors."""
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny", tie_word_embeddings=True))
    engine = _sgd_engine(model, gas=1, micro=1)
    write_model_metadata(tmp_path / "checkpoints", model.config, load_tokenizer(workspace[1]), "fp32")
    CheckpointManager(tmp_path / "checkpoints", keep=None, rank=0).write(engine, tag_for(0), {})
    capfd.readouterr()
    export_checkpoint(tmp_path / "checkpoints", tmp_path / "out")
    printed = capfd.readouterr()
    assert printed.out == printed.err == "", "DeepSpeed's reader prints into the training's progress bar"
    exported = GPTNeoX.from_pretrained(tmp_path / "out")
    assert exported.embed_out.weight is exported.gpt_neox.embed_in.weight
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(exported.eval()(ids), engine.module.eval()(ids))
    # what makes the directory a chat model for Hugging Face tools (tests/test_hf_chat.py uses them)
    tokenizer = load_tokenizer(tmp_path / "out")
    eos, pad = tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|padding|>")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (eos, pad)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == reply_stop_ids(tokenizer) and generation["pad_token_id"] == pad
    assert {k: generation[k] for k in DEFAULT_SAMPLING} == DEFAULT_SAMPLING
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"] == 2048  # not the default 4096

    # a re-export with fewer shards leaves none of the earlier export's weight files behind
    export_checkpoint(tmp_path / "checkpoints", tmp_path / "resharded", max_shard_size=100_000)
    assert len(list((tmp_path / "resharded").glob("model-*-of-*.safetensors"))) > 1
    export_checkpoint(tmp_path / "checkpoints", tmp_path / "resharded")
    assert sorted(p.name for p in (tmp_path / "resharded").glob("model*")) == ["model.safetensors"]
    mode = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert len(mode) == 1, "the weights are readable like the other files"


def test_a_failed_export_shows_what_deepspeed_printed(workspace, tmp_path, capfd):
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
    engine = _sgd_engine(model, gas=1, micro=1)
    write_model_metadata(tmp_path / "checkpoints", model.config, load_tokenizer(workspace[1]), "fp32")
    CheckpointManager(tmp_path / "checkpoints", keep=None, rank=0).write(engine, tag_for(0), {})
    for optimizer_file in (tmp_path / "checkpoints" / tag_for(0)).glob("*optim_states.pt"):
        optimizer_file.unlink()
    capfd.readouterr()
    with pytest.raises(Exception):
        export_checkpoint(tmp_path / "checkpoints", tmp_path / "out")
    assert "Processing zero checkpoint" in capfd.readouterr().err


@pytest.mark.slow
def test_a_stop_skips_evaluation_and_saves_each_step_once(workspace, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 3 (an evaluation and save step): no evaluation, one save; with save_strategy steps
    the epoch ends (every 2 steps of these 8 conversations) are not saved."""
    real_step, saved = loop.train_step, []

    def signalled_at_step_3(engine, micro_batches, **options):
        result = real_step(engine, micro_batches, **options)
        if engine.global_steps == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def recording(manager, engine, tag, client_state):
        saved.append(tag)
        return real_write(manager, engine, tag, client_state)

    real_write = CheckpointManager.write
    monkeypatch.setattr(loop, "train_step", signalled_at_step_3)
    monkeypatch.setattr(CheckpointManager, "write", recording)
    small = json.dumps([{"vicuna": {"input_file_path": str(SAMPLE / "vicuna_sample.json"), "val_split": 0.8}}])
    out = tmp_path / "stopped"
    assert run_train(workspace, out, "--datasets", small, "--max_steps", "6", "--eval_steps", "3",
                     "--save_steps", "3") == STOPPED_EXIT
    assert "SIGTERM: saved, exiting (resume with --resume)" in capsys.readouterr().out
    assert saved == [tag_for(3)]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # training steps only, no evaluation


# ------------------------------------------------------------------ fp16 overflow
@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """DeepSpeed refuses fp16 on CPUs without AVX512-FP16; the loss scaler logic runs fine regardless.
    Every loss is made infinite, so every step overflows."""
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    original = losses.masked_cross_entropy_from_hidden

    def overflowing(*args):
        total, count = original(*args)
        return total * float("inf"), count

    monkeypatch.setattr(losses, "masked_cross_entropy_from_hidden", overflowing)


@pytest.mark.slow
def test_fp16_overflow_skips_steps_then_stops_after_saving(workspace, tmp_path, fp16_on_cpu, capsys):
    out = tmp_path / "overflow"
    assert run_train(workspace, out, "--dtype", "fp16", "--max_steps", "10", "--max_consecutive_skipped_steps",
                     "3", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1") == 3
    assert "3 optimizer steps in a row skipped for fp16 overflow" in capsys.readouterr().err
    steps = read_metrics(out)
    assert [r["skipped_steps"] for r in steps] == [1, 2, 3]
    assert [r["loss_scale"] for r in steps] == [2.0**16, 2.0**15, 2.0**14]  # hysteresis 2, then halving
    checkpoint = out / "checkpoints" / tag_for(3)
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(3)
    state = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["lr_scheduler"]["last_batch_iteration"] == -1  # the schedule never advanced
    assert state["skipped_steps"] == 3


@pytest.mark.slow
def test_fp16_deepspeed_minimum_scale_error_is_handled(workspace, tmp_path, fp16_on_cpu, capsys):
    ds_config = json.loads((REPO / "ds_config.json").read_text())
    ds_config["fp16"].update(initial_scale_power=1, hysteresis=1)
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    out = tmp_path / "minimum"
    assert run_train(workspace, out, "--dtype", "fp16", "--max_steps", "10", "--deepspeed_config",
                     str(tmp_path / "ds.json"), "--per_device_train_batch_size", "1",
                     "--gradient_accumulation_steps", "1") == 3
    assert "fp16 overflow at the minimum loss scale at step 2" in capsys.readouterr().err
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(1)


# ------------------------------------------------------------------ separate processes
@pytest.mark.slow
def test_two_ranks_give_the_losses_of_one_rank_with_the_same_global_batch(workspace, tmp_path):
    common = ["--max_steps", "4", "--gradient_accumulation_steps", "2",  # random windows on: keyed by sample
              "--eval_steps", "4"]
    two = tmp_path / "two"
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    run = subprocess.run(launcher + script_argv(workspace, two, "--per_device_train_batch_size", "1", *common,
                                                 "--deepspeed"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    one = tmp_path / "one"
    assert run_train(workspace, one, "--per_device_train_batch_size", "2", *common) == 0
    two_steps, one_steps = read_metrics(two), read_metrics(one)
    assert len(two_steps) == len(one_steps) == 5  # 4 steps + 1 evaluation
    keys = ("loss", "grad_norm", "eval_oasst_export_loss", "eval_vicuna_accuracy")
    assert all(any(key in b for b in one_steps) for key in keys)  # a renamed key must not skip its check
    for a, b in zip(two_steps, one_steps):
        for key in keys:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert json.loads((two / "ds_config.resolved.json").read_text())["train_batch_size"] == 4


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_exits_resumable(workspace, tmp_path):
    out = tmp_path / "signalled"
    # without the launch variables this (in-process, world 1) test process has set: train.py picks its own
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_ADDR", "MASTER_PORT")}
    environment["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen([sys.executable] + script_argv(workspace, out, "--max_steps", "5000"),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not start: " + process.communicate()[0][-3000:])
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == STOPPED_EXIT == 75, output[-3000:]  # stopped early, resumable
    assert "SIGTERM: saved, exiting" in output
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 2 <= last_step < 5000
    assert json.loads((out / "checkpoints" / POINTER).read_text())["latest"] == tag_for(last_step)
    state = torch.load(out / "checkpoints" / tag_for(last_step) / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["global_steps"] == last_step and state["step_in_epoch"] >= 1  # the position after that step
    assert not (out / "model.safetensors").exists()  # stopped, not finished: no final export


@pytest.mark.slow
def test_help_and_a_bad_config_fail_fast():
    help_run = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_run.returncode == 0 and "always drives DeepSpeed" in help_run.stdout
    module_help = subprocess.run([sys.executable, "-m", "gptneox.train", "--help"], cwd=REPO, capture_output=True,
                                 text=True)
    # each names the command as it was typed
    assert help_run.stdout.startswith("usage: train.py [--configs NAME [NAME ...]] [--KEY VALUE ...]\n")
    assert module_help.stdout.startswith("usage: python -m gptneox.train [--configs NAME")
    assert module_help.stdout.replace("python -m gptneox.train", "train.py", 1) == help_run.stdout
    bad = subprocess.run([sys.executable, "train.py", "--configs", "defaults", "tiny", "--warmup_step", "3"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("train.py: error: --warmup_step: unknown key")
    assert "did you mean 'warmup_steps'" in bad.stderr
    bad_module = subprocess.run([sys.executable, "-m", "gptneox.train", "--configs", "no-such-section"], cwd=REPO,
                                capture_output=True, text=True)
    assert bad_module.returncode == 2
    assert bad_module.stderr.startswith("python -m gptneox.train: error: unknown config 'no-such-section'")
    no_model = subprocess.run([sys.executable, "train.py", "--configs", "defaults", "stablelm-7b", "oasst-mix",
                               "--cache_dir", str(REPO / "no-such-cache")], cwd=REPO, capture_output=True, text=True)
    assert no_model.returncode == 2 and "Nothing is downloaded" in no_model.stderr
    assert "shm_comm" not in no_model.stdout + no_model.stderr  # refused before DeepSpeed set up its backend
    flash_fp32 = subprocess.run([sys.executable, "train.py", "--configs", "defaults", "tiny", "sample-mix",
                                 "--dtype", "fp32", "--use_flash_attention", "true"],
                                cwd=REPO, capture_output=True, text=True)
    assert flash_fp32.returncode == 2
    assert flash_fp32.stderr.strip().splitlines() == [
        "train.py: error: use_flash_attention=True with dtype fp32 on cpu: attention_backend='flash' runs only on "
        "CUDA in float16/bfloat16, got cpu float32; use 'sdpa' (or 'flex') here; or train without it: "
        "use_flash_attention false (PyTorch SDPA) or attention_backend flex"]
    assert "training conversations" not in flash_fp32.stdout  # before the datasets and weights were read


@pytest.mark.slow
def test_packed_rows_give_the_loss_of_padded_rows(workspace, tmp_path, monkeypatch):
    common = ["--max_steps", "1", "--max_length", "256", "--eval_steps", "100"]
    assert run_train(workspace, tmp_path / "padded", *common) == 0
    packed_batches, collate = [], DialogueCollator.__call__

    def spy(self, *args, **kwargs):  # the --pack run must really train on packed rows
        batch = collate(self, *args, **kwargs)
        packed_batches.append("segment_ids" in batch)
        return batch

    monkeypatch.setattr(DialogueCollator, "__call__", spy)
    assert run_train(workspace, tmp_path / "packed", *common, "--pack") == 0
    assert any(packed_batches)
    padded, packed = read_metrics(tmp_path / "padded")[0], read_metrics(tmp_path / "packed")[0]
    assert packed["loss"] == pytest.approx(padded["loss"], rel=1e-5)
    assert packed["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_compiled_blocks_train_like_uncompiled_ones(workspace, tmp_path):
    """compile: true through DeepSpeed with gradient checkpointing and packed rows: the losses and gradient
    norms of compile: false, and the same parameter names in the exported model.

    Tolerance: inductor fuses LayerNorm, GELU, bias and residual adds into kernels that reassociate fp32 sums
    (about 1e-7 relative per op; the runs differed by 3e-8 when written); rel 1e-5 leaves room for other CPUs,
    while a block the compiler got wrong moves the first loss (about 7.3) by far more."""
    from torch._dynamo.utils import counters
    from safetensors import safe_open

    common = ["--max_steps", "3", "--eval_steps", "100", "--gradient_checkpointing", "--pack"]
    counters.clear()
    assert run_train(workspace, tmp_path / "eager", *common) == 0
    assert counters["stats"]["unique_graphs"] == 0
    assert run_train(workspace, tmp_path / "compiled", *common, "--compile") == 0
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really ran compiled
    eager, compiled = ([r for r in read_metrics(tmp_path / run) if "loss" in r] for run in ("eager", "compiled"))
    assert [r["step"] for r in compiled] == [1, 2, 3]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)

    def exported_names(run):
        with safe_open(tmp_path / run / "model.safetensors", "pt") as weights:
            return sorted(weights.keys())

    assert exported_names("compiled") == exported_names("eager")
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in exported_names("compiled")


# ------------------------------------------------------------------ optimizer implementation
def test_fused_cpu_adamw_gives_the_loss_curve_of_the_plain_one(workspace):
    """resolve_ds_config picks torch's fused AdamW on CPU; a few steps must match the for-loop AdamW."""
    template = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
                "zero_optimization": {"stage": 2}}
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, warmup_steps=0)  # no scheduler: a constant rate, no warm-up
    fused_config, _ = resolve_ds_config(template, cfg, world_size=1, hidden_size=64, total_num_steps=5, cpu=True)
    plain_config = json.loads(json.dumps(fused_config))
    del plain_config["optimizer"]["params"]["fused"]
    plain_config["optimizer"]["params"]["foreach"] = False
    torch.manual_seed(1)
    micro_batches = [_batch(torch.randint(0, 1024, (12,)).tolist(), list(range(2, 11))) for _ in range(4)]
    micro_batches = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(micro_batches[::2], micro_batches[1::2])]

    def curve(config):
        torch.manual_seed(0)
        model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, cfg.weight_decay),
                                          config=config)
        losses_ = [train_step(engine, micro_batches).loss for _ in range(5)]
        return losses_, engine.optimizer.optimizer.defaults

    fused_losses, fused_defaults = curve(fused_config)
    plain_losses, plain_defaults = curve(plain_config)
    assert fused_defaults["fused"] is True and not plain_defaults["fused"] and plain_defaults["foreach"] is False
    assert fused_losses[-1] < fused_losses[0] - 0.1  # it trains
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)


def test_half_an_epoch_without_evaluation_and_no_key_refused_before_anything(workspace, tmp_path, capsys):
    """--num_train_epochs 0.5 runs ceil(steps_per_epoch / 2) steps (the Trainer's rule); eval_strategy no
    evaluates never, not even at the end; --no-eval_steps is one line at parse time, before any directory."""
    out = tmp_path / "half"
    assert run_train(workspace, out, "--num_train_epochs", "0.5", "--eval_strategy", "no", "--save_steps", "1000") == 0
    printed = capsys.readouterr().out
    steps_per_epoch = int(printed.split(" steps/epoch of ")[0].rsplit(" ", 1)[1])
    records = read_metrics(out)
    assert steps_per_epoch > 2 and [r["step"] for r in records if "loss" in r] == list(
        range(1, -(-steps_per_epoch // 2) + 1))
    assert not [key for r in records for key in r if key.startswith("eval")]
    assert "eval_strategy no: never evaluated" in printed

    assert run_train(workspace, tmp_path / "refused", "--no-eval_steps") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].endswith("--no-eval_steps: eval_steps cannot be null (it takes INT); "
                                               "to switch evaluation off: eval_strategy no")
    assert not (tmp_path / "refused").exists()
