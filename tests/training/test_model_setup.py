"""From model_name to a model ready for DeepSpeed: local directories, dtype, vocabulary, parameter groups."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.data import load_tokenizer, save_tokenizer
from gptneox.training.config import TrainConfig, TrainConfigError, parse_train_config
from gptneox.training.model_files import find_model_dir, load_run_tokenizer
from gptneox.training.model_setup import (build_training_model, choose_attention_backend, parameter_groups,
                                          training_model_config)

REPO = Path(__file__).resolve().parents[2]


def test_hub_id_without_local_files_says_where_to_put_them(tmp_path):
    with pytest.raises(TrainConfigError, match=r"Nothing is downloaded: the Hugging Face files .* are needed; put "
                                               rf"them in {tmp_path}/stabilityai/stablelm-base-alpha-7b, fetch them "
                                               r"into the Hugging Face cache beforehand \(hf download "):
        find_model_dir("stabilityai/stablelm-base-alpha-7b", str(tmp_path))
    # the bundled sample's cache_dir is inside the installed package: never a place to suggest
    cfg = parse_train_config(["--configs", "defaults", "tiny", "sample-mix", "--model_name", "org/name"])
    with pytest.raises(TrainConfigError) as refused:
        find_model_dir(cfg.model_name, cfg.cache_dir)
    advice = str(refused.value).partition("Nothing is downloaded")[2]
    assert "put them in" not in advice and "data/sample" not in advice and "hf download org/name" in advice
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
        tokenizer = load_run_tokenizer(cfg)
        config = training_model_config(cfg, tokenizer)
        model, line = build_training_model(cfg, config, {"zero_optimization": {"stage": 2}})
        assert tokenizer.get_vocab_size() == 1541 and str(tmp_path / "model") in line
        assert config.vocab_size == model.config.vocab_size == expected
        assert model.output_embedding.shape[0] == expected
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


def test_attention_backend_is_checked_from_the_config_alone(monkeypatch):
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--dtype", "fp32"])
    assert choose_attention_backend(cfg, "cpu") == ("sdpa", "sdpa")
    cfg = parse_train_config(["--configs", "defaults", "stablelm-7b"])  # fp16 + use_flash_attention: true
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(TrainConfigError, match="use_flash_attention=True with dtype fp16 on cuda: .*not installed"
                                               ".*use_flash_attention false"):
        choose_attention_backend(cfg, "cuda")
    cfg = parse_train_config(["--configs", "defaults", "tiny", "--attention_backend", "flex"])
    with pytest.raises(TrainConfigError, match="attention_backend='flex' with dtype fp32 on cpu: .*no FlexAttention "
                                               "backward"):
        choose_attention_backend(cfg, "cpu")
    with pytest.raises(TrainConfigError, match="attention_backend='xformers' is not supported"):
        parse_train_config(["--configs", "defaults", "tiny", "--attention_backend", "xformers"])


def test_a_preset_without_tokenizer_names_the_bundled_one_and_model_directories():
    cfg = parse_train_config(["--configs", "defaults", "tiny"])
    with pytest.raises(TrainConfigError, match=r"model_name='tiny' is a preset \(random weights, no files\), so it has "
                                               r"no tokenizer: add the bundled section sample-tokenizer to --configs "
                                               r"\(the sample tokenizer, .*data/sample/tokenizer.json\), or set "
                                               r"tokenizer_path .*\(EleutherAI/pythia-70m"):
        load_run_tokenizer(cfg)
    named = parse_train_config(["--configs", "defaults", "tiny", "sample-tokenizer"])
    assert Path(named.tokenizer_path).read_bytes() == (REPO / "data" / "sample" / "tokenizer.json").read_bytes()
    assert load_run_tokenizer(named).token_to_id("<|assistant|>") is not None


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "fp16"], "dtype='fp16': DeepSpeed does not train in fp16 on the cpu accelerator; use --dtype bf16 "
                          "here (the defaults section's fp16 is for GPUs)"),
    (["--warmup_steps", "0"], "ds_config scheduler.params.warmup_num_steps=0 (warmup_steps): DeepSpeed's "
                              "WarmupDecayLR needs a positive integer (set warmup_steps 1 or more, or remove the "
                              "scheduler section for a constant learning rate)"),
])
def test_what_deepspeed_would_refuse_after_loading_is_refused_before_reading_anything(tmp_path, capsys, flags,
                                                                                       message):
    """DeepSpeed refuses fp16 on a CPU, and a scheduler without warm-up steps, only inside initialize (a
    traceback after the data and weights are read); here both are one line before anything is read."""
    from gptneox.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--configs", "defaults", "tiny", "sample-mix", "--output_dir", str(out), *flags]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and message in captured.err, captured.err
    assert "records read" not in captured.out and not out.exists()
