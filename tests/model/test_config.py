import json

import pytest
import torch

from gptneox import ConfigError, GPTNeoX, GPTNeoXConfig
from gptneox.config import PRESETS


def parameter_count(config: GPTNeoXConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPTNeoX(config).parameters())


@pytest.mark.parametrize("name, expected", [
    ("pythia-70m", 70_426_624),        # published Pythia counts, reference/gptneox.md 1.1
    ("pythia-160m", 162_322_944),
    ("stablelm-base-alpha-3b", 3_637_321_728),
    ("stablelm-base-alpha-7b", 7_868_755_968),
    ("pythia-12b", 11_846_072_320),
    ("gpt-neox-20b", 20_554_567_680),     # the GPT-NeoX-20B paper's count
])
def test_preset_parameter_counts(name, expected):
    assert parameter_count(GPTNeoXConfig.from_name(name)) == expected


def test_presets_shapes():
    seven = GPTNeoXConfig.from_name("stablelm-base-alpha-7b")
    assert (seven.head_dim, seven.rotary_ndims, seven.vocab_size) == (128, 32, 50432)
    assert GPTNeoXConfig.from_name("stablelm-base-alpha-3b").vocab_size == 50688
    assert GPTNeoXConfig.from_name("pythia-70m").rotary_ndims == 16
    assert GPTNeoXConfig.from_name("pythia-12b").num_attention_heads == 40
    tiny = GPTNeoXConfig.from_name("tiny", vocab_size=50288)
    assert tiny.vocab_size == 50288 and tiny.hidden_size <= 128
    assert {"tiny", "pythia-1b", "pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "pythia-410m"} <= set(PRESETS)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ConfigError, match="pythia-70m") as err:
        GPTNeoXConfig.from_name("pythia-70")
    assert "'pythia-70'" in str(err.value)


def test_misspelt_override_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="'hiden_size'.*did you mean 'hidden_size'"):
        GPTNeoXConfig.from_name("tiny", hiden_size=3)


def test_old_and_new_rotary_keys_agree():
    base = GPTNeoXConfig.from_name("tiny").to_hf()
    for key in ("rope_parameters", "rotary_pct", "rotary_emb_base"):
        base.pop(key)
    old = GPTNeoXConfig.from_hf({**base, "rotary_pct": 0.5, "rotary_emb_base": 500})
    new = GPTNeoXConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                             "partial_rotary_factor": 0.5}})
    top = GPTNeoXConfig.from_hf({**base, "partial_rotary_factor": 0.5, "rope_theta": 500.0})
    assert old == new == top
    assert (old.rotary_pct, old.rotary_emb_base) == (0.5, 500.0)


def test_to_hf_round_trip_and_file(tmp_path):
    config = GPTNeoXConfig.from_name("pythia-160m", tie_word_embeddings=True, hidden_act="gelu_new")
    config.save(tmp_path)
    assert GPTNeoXConfig.from_hf(tmp_path) == config
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    assert raw["rotary_pct"] == 0.25 and raw["model_type"] == "gpt_neox"


def test_irrelevant_hf_keys_are_tolerated():
    raw = {**GPTNeoXConfig.from_name("tiny").to_hf(), "transformers_version": "4.28.1", "torch_dtype": "float16",
           "use_cache": False, "id2label": {"0": "a"}, "classifier_dropout": 0.1, "_name_or_path": "x",
           "rope_scaling": None, "attention_dropout": 0.0}
    assert GPTNeoXConfig.from_hf(raw).hidden_size == 64


@pytest.mark.parametrize("change, message", [
    ({"rotary_pct": 0.5}, "contradictory rotary settings.*rotary_pct=0.5"),
    ({"rope_theta": 20.0}, "contradictory rotary settings.*rope_theta=20.0"),
    ({"num_attention_heads": 5}, "hidden_size=64 is not divisible by num_attention_heads=5"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"hidden_dropout": 0.1}, "hidden_dropout=0.1"),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({"rope_parameters": {"rope_type": "yarn"}}, "rope_type='yarn'"),
    ({"sliding_window": 128}, "unsupported keys \\['sliding_window'\\]"),
    ({"vocab_size": -3}, "vocab_size must be a positive integer, got -3"),
])
def test_bad_hf_configs_name_key_and_value(change, message):
    raw = {**GPTNeoXConfig.from_name("tiny").to_hf(), **change}
    with pytest.raises(ConfigError, match=message):
        GPTNeoXConfig.from_hf(raw)


def test_odd_rotary_dims_rejected():
    with pytest.raises(ConfigError, match="odd number of rotary dims"):
        GPTNeoXConfig.from_name("tiny", rotary_pct=0.3125)  # 16 * 0.3125 = 5


def test_bad_config_file_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        GPTNeoXConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")  # JSON, but no object: was a TypeError from dict()
    with pytest.raises(ConfigError, match="config.json: a JSON list, not the object of a model config"):
        GPTNeoXConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere: config.json not found"):
        GPTNeoXConfig.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({**GPTNeoXConfig().to_hf(), "hidden_dropout": 0.2}))
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: hidden_dropout=0.2"):
        GPTNeoXConfig.from_hf(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"use_parallel_residual": "false"}, "use_parallel_residual='false' should be true or false, not a string"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false' should be true or false, not a string"),
    ({"tie_word_embeddings": 0}, "tie_word_embeddings=0 should be true or false, not an integer"),
    ({"layer_norm_eps": "1e-5"}, "layer_norm_eps='1e-5' should be a number, not a string"),
    ({"hidden_size": True}, "hidden_size=True should be an integer, not a boolean"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers=2.0 should be an integer, not a number"),
    ({"hidden_act": ["gelu"]}, "hidden_act=\\['gelu'\\] should be a string, not a list"),
    ({"pad_token_id": "0"}, "pad_token_id='0' should be an integer or null, not a string"),
    ({"eos_token_id": -1}, "eos_token_id must be a token id"),
    ({"initializer_range": float("nan")}, "initializer_range=nan must be a finite number"),
    ({"attention_dropout": "0.0"}, "attention_dropout='0.0' should be a number, not a string"),
])
def test_every_field_is_type_checked_naming_file_field_and_value(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**GPTNeoXConfig.from_name("tiny").to_hf(), **change}))
    with pytest.raises(ConfigError, match=f"^{tmp_path}/config.json: {message}") as err:
        GPTNeoXConfig.from_hf(tmp_path)
    assert "\n" not in str(err.value)


def test_floats_accept_integers_and_nullable_ids_accept_null():
    raw = {**GPTNeoXConfig.from_name("tiny").to_hf(), "layer_norm_eps": 1, "initializer_range": 0,
           "pad_token_id": None, "bos_token_id": None}
    config = GPTNeoXConfig.from_hf(raw)
    assert type(config.layer_norm_eps) is float and config.layer_norm_eps == 1.0
    assert type(config.initializer_range) is float
    assert config.pad_token_id is None and config.bos_token_id is None
    with pytest.raises(ConfigError, match="use_parallel_residual=1 should be true or false"):
        GPTNeoXConfig.from_name("tiny", use_parallel_residual=1)  # presets and overrides are checked too
