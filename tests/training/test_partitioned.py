"""ZeRO-3 on two CPU ranks (the deepspeed launcher, as a user runs it): a model built into its partitions
equals the whole one, a rank whose micro-batch is empty stays in step (ZeRO-2 and ZeRO-3), and the same tiny
run under ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload gives the same losses and exported weights; a ZeRO-3
resume continues exactly. fp32 throughout; each run writes its own metrics file, so no rank's output is
parsed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.training.checkpoint import POINTER, tag_for
from gptneox.training.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample"
DATASETS = [{"code_alpaca": {"input_file_path": str(SAMPLE / "code_alpaca_sample.jsonl"), "val_split": 0.2}},
            {"vicuna": {"input_file_path": str(SAMPLE / "vicuna_sample.json"), "val_split": 0.2}}]
# Two ranks of one micro-batch, two accumulation steps; evaluation at steps 2 and 4 on 4 conversations, one
# batch of 8, so rank 1 has none and runs the stand-in forward. adam_epsilon 1e-6: the key biases have a
# zero gradient in exact arithmetic (softmax ignores a shift that is the same for every key), and with the
# default 1e-12 Adam turns their rounding noise, which differs between the stages, into steps of the full
# learning rate.
RUN = ["--max_length", "64", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
       "--eval_size", "4", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
       "--gradient_checkpointing", "true", "--adam_epsilon", "1e-6"]


def launch(*argv, timeout: float = 300) -> None:
    port = free_port()
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)]
    run = subprocess.run(launcher + [str(a) for a in argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    # DeepSpeed's CPU communication op would leave a 69 MB buffer per rank here, never unlinked
    assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*")), "a launch left shared memory behind"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero3")
    (root / "mix.yaml").write_text(json.dumps({"mix": {"datasets": DATASETS}}))
    return root


def train(data: Path, output_dir: Path, ds_config: str, *extra) -> Path:
    launch("train.py", "--configs", "defaults", "tiny", data / "mix.yaml", "--tokenizer_path",
           SAMPLE / "tokenizer.json", "--output_dir", output_dir, *RUN, "--deepspeed_config", ds_config,
           "--deepspeed", *extra)
    return output_dir


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_figures(ours: list[dict], theirs: list[dict]) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 2, 3, 4, 4]
    for a, b in zip(ours, theirs):
        keys = [k for k in b if k == "loss" or k.startswith("eval_") or k == "grad_norm"]
        assert keys and set(keys) <= set(a), (b["step"], keys)
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def zero2(data) -> Path:
    return train(data, data / "zero2", "ds_config.json")


@pytest.fixture(scope="module")
def zero3(data) -> Path:
    return train(data, data / "zero3", "ds_config_zero3.json")


@pytest.mark.slow
def test_a_partitioned_model_equals_the_whole_one_and_an_empty_micro_batch_keeps_ranks_in_step(tmp_path):
    torch.manual_seed(3)
    pretrained = GPTNeoX(GPTNeoXConfig.from_name("tiny"))  # 1024 rows; the run's vocabulary is 1552
    with torch.no_grad():
        for parameter in pretrained.parameters():
            if parameter.dim() == 1:  # LayerNorms and biases away from their 1 / 0 init
                parameter.add_(0.1 * torch.randn_like(parameter))
    pretrained.save_pretrained(tmp_path / "pretrained")
    launch(REPO / "tests" / "scripts" / "zero_stages.py", tmp_path / "pretrained", tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["random_init_difference"] == 0.0  # same seed, same weights
        assert seen["streamed_difference"] == 0.0     # streamed rank 0 -> partitions, new rows at the mean
        assert seen["streamed_rows"] == [1552, 64]
        assert len(seen["zero3_losses"]) == 3
        assert seen["zero3_losses"] == pytest.approx(seen["zero2_losses"], rel=1e-5)
        assert seen["zero3_checksum"] == pytest.approx(seen["zero2_checksum"], rel=1e-6)
    assert ranks[0] == ranks[1]  # the rank without samples took the same steps


@pytest.mark.slow
def test_zero3_gives_the_losses_and_the_exported_model_of_zero2(zero2, zero3):
    assert_same_figures(metrics(zero3), metrics(zero2))
    assert json.loads((zero3 / "ds_config.resolved.json").read_text())["zero_optimization"]["stage"] == 3
    assert (zero3 / "checkpoints" / tag_for(4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    exported, reference = load_file(zero3 / "model.safetensors"), load_file(zero2 / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    ours = GPTNeoX.from_pretrained(zero3).eval()
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(zero3).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_zero3_resume_continues_exactly(data, zero3, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(zero3 / "checkpoints", resumed / "checkpoints")
    (resumed / "checkpoints" / POINTER).write_text(json.dumps({"latest": tag_for(2), "complete": [tag_for(2)]}))
    train(data, resumed, "ds_config_zero3.json", "--resume")
    straight = metrics(zero3)[3:]
    again = metrics(resumed)
    assert [r["step"] for r in again] == [3, 4, 4]
    for a, b in zip(again, straight):  # bit for bit; only the timings and memory may differ
        exact = [k for k in b if k in ("loss", "lr", "grad_norm", "epoch") or k.startswith("eval_")]
        assert exact and {k: a[k] for k in exact} == {k: b[k] for k in exact}, a["step"]


@pytest.mark.slow
def test_zero3_with_cpu_offload_gives_the_losses_of_zero2(data, zero2, tmp_path):
    offload = train(data, tmp_path / "offload", "ds_config_zero3_offload.json")
    resolved = json.loads((offload / "ds_config.resolved.json").read_text())
    assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert resolved["optimizer"]["params"]["torch_adam"] is True  # on CPU; DeepSpeedCPUAdam on a GPU node
    assert_same_figures(metrics(offload), metrics(zero2))
