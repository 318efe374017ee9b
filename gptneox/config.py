"""GPT-NeoX hyper-parameters: one dataclass, named presets, and Hugging Face `config.json` I/O.

Reading a config is strict on purpose: a key that would change the math and that we do not implement
must fail loudly at load time rather than give a model that silently computes something else.
"""
from __future__ import annotations

import difflib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from gptneox.errors import MissingFileError, UserError

# Activation names Hugging Face uses for GPT-NeoX, mapped to torch's `F.gelu(approximate=...)`.
# The tanh variants differ only in how the constant sqrt(2/pi) is spelled, not in the formula.
GELU_APPROXIMATION = {
    "gelu": "none",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_accurate": "tanh",
}

# Keys that Hugging Face writes into config.json but that do not change the forward pass of a causal LM.
_IGNORED_HF_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "id2label", "label2id",
    "classifier_dropout", "is_decoder", "is_encoder_decoder", "tokenizer_class", "problem_type",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "pruned_heads",
    "chunk_size_feed_forward", "finetuning_task", "task_specific_params", "prefix", "sep_token_id",
    "decoder_start_token_id", "gradient_checkpointing", "num_labels", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss", "use_bfloat16", "model_type",
}
_ROTARY_KEYS = ("rotary_pct", "rotary_emb_base", "rope_parameters", "rope_scaling", "partial_rotary_factor",
                "rope_theta")
_ZERO_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "attention_probs_dropout_prob",
                      "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def did_you_mean(word: str, choices, n: int = 1, cutoff: float = 0.6, quote: bool = True) -> str:
    """"; did you mean 'x'?" for the closest of `choices`, or "" when none is close: the tail of an error.
    Keys are quoted; names the user types as words (presets, config sections) read better bare."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) if quote else c for c in close)}?" if close else ""


class ConfigError(UserError, ValueError):
    """A config value we cannot honour; the message names the key and the value."""


@dataclass
class GPTNeoXConfig:
    """Shapes and numerics of a GPT-NeoX model; field names follow Hugging Face's GPTNeoXConfig."""

    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 16
    num_attention_heads: int = 48
    intermediate_size: int = 24576
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 4096
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    attention_bias: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        _check_field_types(self)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"rotary_pct must be in [0, 1], got {self.rotary_pct!r}")
        if self.rotary_ndims % 2:
            raise ConfigError(f"rotary_pct={self.rotary_pct} gives an odd number of rotary dims "
                              f"({self.rotary_ndims} of head_dim {self.head_dim}); rotate-half needs an even count")
        if self.rotary_emb_base <= 0:
            raise ConfigError(f"rotary_emb_base must be positive, got {self.rotary_emb_base!r}")
        if self.hidden_act not in GELU_APPROXIMATION:
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported; "
                              f"expected one of {sorted(GELU_APPROXIMATION)}")
        if self.layer_norm_eps <= 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a token id (0 or more) or null, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        # int() truncation is what both Hugging Face and EleutherAI use.
        return int(self.head_dim * self.rotary_pct)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPTNeoXConfig":
        """A named preset (see PRESETS), optionally with some fields overridden."""
        if name not in PRESETS:
            hint = did_you_mean(name, PRESETS, n=3, cutoff=0.4, quote=False)
            raise ConfigError(f"unknown model preset {name!r}{hint} Known presets: {', '.join(PRESETS)}")
        field_names = [f.name for f in fields(cls)]
        for key in overrides:  # a ConfigError with a suggestion, not the dataclass's bare TypeError
            if key not in field_names:
                raise ConfigError(f"from_name({name!r}): unknown config field {key!r}{did_you_mean(key, field_names)}")
        return cls(**{**PRESETS[name], **overrides})

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "GPTNeoXConfig":
        """Parse a Hugging Face GPT-NeoX config: a dict, a config.json path, or a directory holding one."""
        where = "config"
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise MissingFileError(f"{path}: config.json not found")
            try:
                source = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(source, dict):
                raise ConfigError(f"{path}: a JSON {type(source).__name__}, not the object of a model config")
            where = str(path)
        try:
            return cls(**_parse_hf(dict(source)))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_hf(self) -> dict:
        """The config.json content; old (rotary_*) and new (rope_parameters) rotary keys are both written
        so that transformers 4.x and 5.x read the same values."""
        out = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **asdict(self)}
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rotary_emb_base,
                                  "partial_rotary_factor": self.rotary_pct}
        out.update(attention_dropout=0.0, hidden_dropout=0.0, use_cache=True)
        return out

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")
        return path


def _parse_hf(raw: dict) -> dict:
    """Map a config.json dict onto our fields, rejecting anything that would change the math."""
    if raw.get("model_type", "gpt_neox") != "gpt_neox":
        raise ConfigError(f"model_type={raw['model_type']!r} is not 'gpt_neox'")
    for key in _ZERO_DROPOUT_KEYS:
        value = raw.pop(key, 0.0)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{key}={value!r} should be a number, not {_json_type(value)}")
        if value not in (0, 0.0, None):
            raise ConfigError(f"{key}={value!r}: non-zero dropout is not supported (fine-tuning runs without it)")
    rotary = _parse_rotary({k: raw.pop(k) for k in _ROTARY_KEYS if k in raw})
    field_names = {f.name for f in fields(GPTNeoXConfig)}
    kwargs = {k: raw.pop(k) for k in list(raw) if k in field_names}
    unknown = sorted(k for k in raw if k not in _IGNORED_HF_KEYS and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"unsupported keys {unknown} (values {[raw[k] for k in unknown]}); "
                          "they may change the model's math, so they are not ignored")
    if isinstance(kwargs.get("eos_token_id"), list):
        raise ConfigError(f"eos_token_id={kwargs['eos_token_id']!r}: a list of eos ids is not supported")
    return {**kwargs, **rotary}


def _check_field_types(config: GPTNeoXConfig) -> None:
    """Every field against its annotation, before any value is used: in Python the string "false" is true
    and True is the integer 1, so a loosely typed config.json would build a different model without a word.
    Floats accept integers (JSON writes 1e5 as 100000.0 or 100000) and are stored as floats."""
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if value is None and type(None) in allowed:
            continue
        kind = next(k for k in allowed if k is not type(None))
        if kind is float and type(value) in (int, float):
            if not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
            setattr(config, name, float(value))
        elif type(value) is not kind:  # exact: a bool is not an int here, nor an int a bool
            expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
            raise ConfigError(f"{name}={value!r} should be {expected}"
                              f"{' or null' if type(None) in allowed else ''}, not {_json_type(value)}")


def _json_type(value: Any) -> str:
    """What a value is called in a config.json, with its article."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _parse_rotary(keys: dict) -> dict:
    """Reconcile the three spellings of the rotary settings; disagreeing spellings are an error."""
    if keys.get("rope_scaling") not in (None, {}):
        raise ConfigError(f"rope_scaling={keys['rope_scaling']!r}: RoPE scaling is not supported")
    params = keys.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_parameters={params!r} is not a dict")
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise ConfigError(f"rope_parameters.rope_type={params.get('rope_type', params.get('type'))!r}: "
                          "only 'default' RoPE is supported")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if extra:
        raise ConfigError(f"rope_parameters has unsupported keys {extra}")
    spellings = {
        "rotary_pct": [("rotary_pct", keys.get("rotary_pct")),
                       ("partial_rotary_factor", keys.get("partial_rotary_factor")),
                       ("rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor"))],
        "rotary_emb_base": [("rotary_emb_base", keys.get("rotary_emb_base")),
                            ("rope_theta", keys.get("rope_theta")),
                            ("rope_parameters.rope_theta", params.get("rope_theta"))],
    }
    out = {}
    for field_name, candidates in spellings.items():
        given = [(k, v) for k, v in candidates if v is not None]
        for key, value in given:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key}={value!r} is not a number")
        if any(not math.isclose(v, given[0][1], rel_tol=1e-9) for _, v in given):
            raise ConfigError("contradictory rotary settings: " + ", ".join(f"{k}={v!r}" for k, v in given))
        if given:
            out[field_name] = float(given[0][1])
    return out


def _pythia(hidden: int, layers: int, heads: int, vocab: int = 50304) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=2048)


# Shapes from the public Hugging Face config.json files (see reference/gptneox.md section 1.1).
PRESETS: dict[str, dict] = {
    # CPU-sized model for tests and demos; the vocabulary is resized to the tokenizer later.
    "tiny": dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, max_position_embeddings=2048),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    "pythia-6.9b": _pythia(4096, 32, 32, vocab=50432),
    "pythia-12b": _pythia(5120, 36, 40, vocab=50688),
    "stablelm-base-alpha-3b": dict(vocab_size=50688, hidden_size=4096, num_hidden_layers=16,
                                   num_attention_heads=32, intermediate_size=16384, max_position_embeddings=4096),
    "stablelm-base-alpha-7b": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=16,
                                   num_attention_heads=48, intermediate_size=24576, max_position_embeddings=4096),
    "gpt-neox-20b": dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                         intermediate_size=24576, max_position_embeddings=2048),
}
