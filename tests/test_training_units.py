"""Training pieces that need no DeepSpeed engine: config merge and overrides, ds_config "auto" resolution,
data order, masked loss, checkpoint pointer and rotation, parameter groups."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.training.checkpoint import POINTER, CheckpointManager, restore_rng_states, rng_states, tag_for
from gptneox.training.config import TrainConfig, TrainConfigError, parse_train_config
from gptneox.training.data_order import DataOrder
from gptneox.training.ds_config import DeepSpeedConfigError, load_ds_config, resolve_ds_config
from gptneox.training.loss import masked_cross_entropy, masked_cross_entropy_from_hidden
from gptneox.data import load_tokenizer, save_tokenizer
from gptneox.training.model_setup import find_model_dir, load_model_and_tokenizer, parameter_groups
from gptneox.training.step import train_step

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ config
def test_sft7_command_line_merges_left_to_right_and_overrides():
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b", "--cache_dir", "DATA", "--output_dir", "OUT",
                              "--num_train_epochs", "4", "--deepspeed", "--local_rank=0"])
    assert cfg.model_name == "stabilityai/stablelm-base-alpha-7b"
    assert (cfg.max_length, cfg.warmup_steps, cfg.gradient_accumulation_steps) == (4096, 100, 2)
    assert (cfg.learning_rate, cfg.adam_beta2, cfg.adam_epsilon, cfg.max_grad_norm) == (1e-5, 0.95, 1e-12, 2.0)
    assert (cfg.cache_dir, cfg.output_dir, cfg.num_train_epochs) == ("DATA", "OUT", 4)
    assert cfg.rng_seed == 0xA1221F97 and cfg.dtype == "fp16" and cfg.gradient_checkpointing


def test_overrides_are_typed_like_the_default():
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--learning_rate", "3e-4", "--max_steps", "7",
                              "--resume", "--gradient_checkpointing", "false", "--no-save_total_limit",
                              "--datasets", "[{vicuna: {val_split: 0.1}}]", "--peak_tflops=1e2"])
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.max_steps == 7 and cfg.resume is True and cfg.gradient_checkpointing is False
    assert cfg.save_total_limit is None and cfg.peak_tflops == 100.0
    assert cfg.datasets == [{"vicuna": {"val_split": 0.1}}]


@pytest.mark.parametrize("argv, message", [
    (["--configs", "defaults", "stablelm7b"], "did you mean stablelm-7b"),
    (["--learnig_rate", "1e-4"], "did you mean 'learning_rate'"),
    (["--max_length", "long"], "--max_length 'long'"),
    (["--dtype", "fp8"], "dtype='fp8'"),
    (["--resume", "maybe"], "--resume 'maybe'"),
])
def test_bad_command_lines_name_the_problem(argv, message):
    with pytest.raises(TrainConfigError, match=message):
        parse_train_config(argv)


def test_unknown_key_in_a_section_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bad:\n  warmup_step: 10\n")
    with pytest.raises(TrainConfigError, match=r"bad.yaml: unknown key 'warmup_step'; did you mean 'warmup_steps'"):
        parse_train_config(["--configs", "defaults", str(bad)])


def test_every_shipped_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert len(paths) >= 8, paths
    for path in paths:
        parse_train_config(["--configs", "defaults", path.stem])


# ------------------------------------------------------------------ ds_config
def _resolve(cfg: TrainConfig, template: dict | None = None, **kwargs):
    template = template or load_ds_config(REPO / "ds_config.json")
    args = dict(world_size=4, hidden_size=6144, total_num_steps=1234, cpu=False) | kwargs
    return resolve_ds_config(template, cfg, **args)


def test_seed_ds_config_resolves_like_the_hf_trainer():
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b"])
    original = load_ds_config(REPO / "ds_config.json")
    resolved, notes = _resolve(cfg, original)
    assert resolved["train_micro_batch_size_per_gpu"] == 4 and resolved["gradient_accumulation_steps"] == 2
    assert resolved["train_batch_size"] == 4 * 2 * 4 and resolved["gradient_clipping"] == 2.0
    assert resolved["optimizer"]["params"] == {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-12, "weight_decay": 0.0}
    assert resolved["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 1e-5, "warmup_num_steps": 100,
                                               "total_num_steps": 1234}
    assert resolved["fp16"]["enabled"] is True and resolved["bf16"]["enabled"] is False
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 1e9  # not "auto" in the seed: kept
    assert "auto" not in json.dumps(resolved)
    assert original["train_batch_size"] == "auto"  # the template is not modified
    assert any("logarithmic warmup" in n for n in notes)


def test_cpu_gets_torch_adam_and_an_auto_bucket_gets_hidden_squared():
    template = load_ds_config(REPO / "ds_config.json")
    template["zero_optimization"]["reduce_bucket_size"] = "auto"
    resolved, notes = _resolve(TrainConfig(dtype="bf16"), template, cpu=True, hidden_size=64)
    assert resolved["optimizer"]["params"]["torch_adam"] is True and any("torch_adam" in n for n in notes)
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False


def test_contradicting_value_names_key_and_both_values():
    template = load_ds_config(REPO / "ds_config.json")
    template["optimizer"]["params"]["lr"] = 3e-4
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer.params.lr=0.0003 .* gives 1e-05"):
        _resolve(TrainConfig(), template)
    template = load_ds_config(REPO / "ds_config.json")
    template["gradient_accumulation_steps"] = 1
    with pytest.raises(DeepSpeedConfigError, match=r"gradient_accumulation_steps=1 .* gives 32"):
        _resolve(TrainConfig(), template)


def test_an_auto_nobody_fills_is_refused():
    template = load_ds_config(REPO / "ds_config.json")
    template["zero_optimization"]["allgather_bucket_size"] = "auto"
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.allgather_bucket_size"):
        _resolve(TrainConfig(), template)


# ------------------------------------------------------------------ data order
def test_global_batch_is_the_same_whatever_the_world_size():
    one = DataOrder(103, micro_batch_size=2, gradient_accumulation_steps=4, world_size=1, rank=0, seed=5)
    two = [DataOrder(103, 2, 2, 2, rank, 5) for rank in range(2)]
    assert one.steps_per_epoch == 12 and two[0].steps_per_epoch == 12
    for epoch in range(2):
        for step in range(12):
            flat_one = [i for mb in one.micro_batches(epoch, step) for i in mb]
            flat_two = [i for order in two for mb in order.micro_batches(epoch, step) for i in mb]
            assert flat_one == flat_two and len(set(flat_one)) == 8
    assert not (one.permutation(0) == one.permutation(1)).all()  # a new order every epoch
    epoch0 = [i for s in range(12) for mb in one.micro_batches(0, s) for i in mb]
    assert len(set(epoch0)) == 96  # no sample twice in an epoch


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        DataOrder(10, 4, 2, 2, 0, 0)


# ------------------------------------------------------------------ loss
def test_masked_loss_is_sum_and_count_of_trained_tokens():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    total, count = masked_cross_entropy(logits, targets, mask)
    assert count.item() == 4
    expected = sum(F.cross_entropy(logits[b, t][None], targets[b, t][None]) for b, t in mask.nonzero().tolist())
    torch.testing.assert_close(total, expected)
    hidden, head = torch.randn(2, 5, 7), torch.randn(11, 7)
    from_hidden, n = masked_cross_entropy_from_hidden(hidden, head, targets, mask)
    torch.testing.assert_close(from_hidden, masked_cross_entropy(hidden @ head.t(), targets, mask)[0])
    empty, zero = masked_cross_entropy(logits, targets, torch.zeros_like(mask))
    assert zero.item() == 0 and empty.item() == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_cross_entropy(logits, targets[:, :4], mask[:, :4])


class _PlainEngine:
    """The part of a DeepSpeed engine that train_step uses, over a plain module with plain autograd."""

    def __init__(self, module):
        self.module, self.device, self.skipped_steps = module, torch.device("cpu"), 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self):
        return 1

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_an_empty_micro_batch_still_gives_every_parameter_a_zero_gradient():
    """ZeRO-2 reduces the gradients a backward reaches: every rank must reach the same ones, all of them."""
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
    empty = {k: torch.zeros((0, 0), dtype=torch.long) for k in ("input_ids", "targets", "attention_mask",
                                                              "position_ids")}
    result = train_step(_PlainEngine(model), [{**empty, "loss_mask": torch.zeros((0, 0), dtype=torch.bool)}])
    assert result.loss == 0.0 and result.trained_tokens == 0
    for name, p in model.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def test_an_empty_micro_batch_in_fp16_logs_zero_not_nan():
    """The stand-in's sum over the output embedding is 65536 here, past fp16's 65504: summed in fp16 it is inf,
    and inf * 0 is NaN in the logged loss and in every gradient."""
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny")).half()
    with torch.no_grad():
        model.output_embedding.fill_(1.0)  # 1024 x 64 ones
    assert torch.isinf(model.output_embedding.sum())
    empty = {k: torch.zeros((0, 0), dtype=torch.long) for k in ("input_ids", "targets", "attention_mask",
                                                              "position_ids")}
    result = train_step(_PlainEngine(model), [{**empty, "loss_mask": torch.zeros((0, 0), dtype=torch.bool)}])
    assert result.loss == 0.0
    assert all(not p.grad.isnan().any() for p in model.parameters())


# ------------------------------------------------------------------ checkpoints
class _FakeEngine:
    """Writes a tag directory the way engine.save_checkpoint does; `fail` simulates a crash mid-save."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        assert save_latest is False
        (Path(directory) / tag).mkdir(parents=True)
        if self.fail:
            raise OSError("disk full")
        (Path(directory) / tag / "state.json").write_text(json.dumps(client_state))


def test_checkpoint_rotation_and_incomplete_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2, rank=0)
    for step in (10, 20, 30):
        manager.save(_FakeEngine(), tag_for(step), {"step": step})
    assert manager.complete_tags() == [tag_for(20), tag_for(30)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [tag_for(20), tag_for(30)]
    with pytest.raises(OSError):
        manager.save(_FakeEngine(fail=True), tag_for(40), {"step": 40})
    assert manager.latest_tag() == tag_for(30)  # the half-written tag is not used ...
    manager.save(_FakeEngine(), tag_for(50), {"step": 50})
    assert not (tmp_path / tag_for(40)).exists()  # ... and is cleaned up by the next rotation
    assert json.loads((tmp_path / POINTER).read_text())["latest"] == tag_for(50)


def test_rng_state_is_the_current_gpus_only(monkeypatch):
    """One state per visible GPU would not restore on a node with fewer GPUs."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    states = rng_states()
    restore_rng_states(states)
    assert restored == [states["cuda"]] and states["cuda"].tolist() == [7]


# ------------------------------------------------------------------ model setup
def test_hub_id_without_local_files_says_where_to_put_them(tmp_path):
    with pytest.raises(TrainConfigError, match=r"Nothing is downloaded: put the Hugging Face files .* in "):
        find_model_dir("stabilityai/stablelm-base-alpha-7b", str(tmp_path))
    assert find_model_dir("tiny", str(tmp_path)) is None
    (tmp_path / "org" / "m").mkdir(parents=True)
    (tmp_path / "org" / "m" / "config.json").write_text("{}")
    assert find_model_dir("org/m", str(tmp_path)) == tmp_path / "org" / "m"


@pytest.mark.parametrize("rows, expected", [(1024, 1552), (2048, 2048)])
def test_pretrained_directory_loads_in_the_training_dtype_and_only_grows_the_vocabulary(tmp_path, rows, expected):
    """A local model directory: its weights (distinctive LayerNorms) and its tokenizer (1541 ids) are used,
    the vocabulary grows to a multiple of 16 that fits the tokenizer, and a larger one is never cut."""
    pretrained = GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=rows))
    torch.nn.init.constant_(pretrained.gpt_neox.final_layer_norm.weight, 3.0)
    pretrained.save_pretrained(tmp_path / "model")
    save_tokenizer(load_tokenizer(REPO / "data" / "sample" / "tokenizer.json"), tmp_path / "model")
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = TrainConfig(model_name="model", cache_dir=str(tmp_path), dtype=dtype, gradient_checkpointing=True)
        model, tokenizer, line = load_model_and_tokenizer(cfg)
        assert tokenizer.get_vocab_size() == 1541 and str(tmp_path / "model") in line
        assert model.config.vocab_size == expected and model.output_embedding.shape[0] == expected
        assert model.output_embedding.dtype == torch_dtype and model.gradient_checkpointing
        assert torch.all(model.gpt_neox.final_layer_norm.weight == 3.0)


def test_weight_decay_spares_biases_and_layernorms():
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "norm" in names[id(p)] for p in no_decay["params"])
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ------------------------------------------------------------------ attention backend and determinism
def test_attention_backend_is_checked_from_the_config_alone(monkeypatch):
    from gptneox.training.model_setup import choose_attention_backend
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--dtype", "fp32"])
    assert choose_attention_backend(cfg, "cpu") == ("sdpa", "sdpa")
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b"])  # fp16 + use_flash_attention: true
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(TrainConfigError, match="use_flash_attention=True with dtype fp16 on cuda: .*not installed"
                                               ".*--use_flash_attention false"):
        choose_attention_backend(cfg, "cuda")
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--attention_backend", "flex"])
    with pytest.raises(TrainConfigError, match="attention_backend='flex' with dtype fp32 on cpu: .*no FlexAttention "
                                               "backward"):
        choose_attention_backend(cfg, "cpu")
    with pytest.raises(TrainConfigError, match="attention_backend='xformers' is not supported"):
        parse_train_config(["--configs", "defaults", "tiny", "--attention_backend", "xformers"])


def test_deterministic_switches_torch_and_cublas(monkeypatch):
    from gptneox.training.determinism import use_deterministic_algorithms
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_algorithms(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    try:
        use_deterministic_algorithms(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        from gptneox.attention import _deterministic
        assert _deterministic()  # what the flash kernels are asked for
    finally:
        torch.use_deterministic_algorithms(False)
