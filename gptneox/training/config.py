"""The training configuration: one dataclass, YAML sections merged left to right, `--key value` overrides.

This mirrors the reference command line (`--configs defaults stablelm-7b oasst-mix --cache_dir ...`) so the
seed's launch command works unchanged, but every key is declared here: a typo fails in the first second
with a suggestion instead of being carried along silently.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from gptneox.config import did_you_mean

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
REPO_DIR = CONFIG_DIR.parent


def repo_path(path: str | Path) -> Path:
    """A relative path of a shipped config section (cache_dir, tokenizer_path), taken from the repository
    root so that tools and benchmarks run from any directory; an absolute path stays as it is."""
    return REPO_DIR / path


# The `dtype` key's values: training precision, export precision, benchmark precision.
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainConfigError(ValueError):
    """A bad configuration: the message names the config file or flag, the key and the value."""


@dataclass
class TrainConfig:
    """Every key a config section or a `--key value` flag may set; defaults follow the reference `defaults`."""

    # model and tokenizer
    model_name: str | None = None           # preset name (random init) or a local Hugging Face directory
    tokenizer_path: str | None = None       # tokenizer.json or a directory; default: the model directory
    dtype: str = "fp16"                     # fp16 | bf16 | fp32
    gradient_checkpointing: bool = False
    use_flash_attention: bool = False       # flash-attn kernels (CUDA, fp16/bf16); checked at start-up
    attention_backend: str | None = None    # sdpa | flash | flex | eager; None: flash if use_flash_attention
    deterministic: bool = False             # deterministic kernels (flash backward, cuBLAS): bitwise resume on GPU
    # data
    datasets: list = field(default_factory=list)
    cache_dir: str = ".cache"
    max_length: int = 512
    val_max_length: int | None = None       # None: same as max_length
    random_offset_probability: float = 0.8
    pad_to_multiple_of: int = 16
    pack: bool = False                      # lay a micro-batch's conversations end to end in max_length rows
    eval_size: int | None = None            # keep only the first N samples of every evaluation set
    sort_by_length: bool = False            # reference option; only False is implemented
    use_custom_sampler: bool = False        # reference option; only False is implemented
    # optimisation
    rng_seed: int = 0xA1221F97
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-12
    warmup_steps: int = 600
    max_grad_norm: float = 2.0
    num_train_epochs: int = 3
    max_steps: int | None = None            # stop after this many optimizer steps (also the schedule length)
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 2
    gradient_accumulation_steps: int = 32
    max_consecutive_skipped_steps: int = 20  # optimizer steps in a row skipped for fp16 overflow before stopping
    # bookkeeping
    deepspeed_config: str = "ds_config.json"
    output_dir: str = "saved_model"
    log_dir: str | None = None              # TensorBoard directory; default OUTPUT_DIR/tensorboard
    logging_steps: int = 10                 # progress-bar refresh; metrics.jsonl gets every step
    eval_steps: int = 200
    save_strategy: str = "steps"            # steps | epoch
    save_steps: int = 1000
    save_total_limit: int | None = 4
    resume: bool = False
    peak_tflops: float | None = None        # accelerator peak for MFU; default: known-GPU table or measured

    def __post_init__(self) -> None:
        checks = {
            "dtype": self.dtype in TORCH_DTYPES,
            "save_strategy": self.save_strategy in ("steps", "epoch"),
            "attention_backend": self.attention_backend in (None, "sdpa", "flash", "flex", "eager"),
            "sort_by_length": not self.sort_by_length,
            "use_custom_sampler": not self.use_custom_sampler,
        }
        for key, ok in checks.items():
            if not ok:
                raise TrainConfigError(f"{key}={getattr(self, key)!r} is not supported "
                                       f"(allowed: {_ALLOWED[key]})")
        for key in ("max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "num_train_epochs", "eval_steps", "save_steps",
                    "logging_steps", "max_consecutive_skipped_steps"):
            if getattr(self, key) < 1:
                raise TrainConfigError(f"{key}={getattr(self, key)!r} must be at least 1")
        if not 0.0 <= self.random_offset_probability <= 1.0:
            raise TrainConfigError(f"random_offset_probability={self.random_offset_probability!r} "
                                   "must be in [0, 1]")

    @property
    def eval_max_length(self) -> int:
        return self.val_max_length or self.max_length

    def to_yaml(self) -> str:
        return yaml.safe_dump({"train": asdict(self)}, sort_keys=False)


_ALLOWED = {"dtype": ", ".join(TORCH_DTYPES), "save_strategy": "steps, epoch",
            "attention_backend": "sdpa, flash, flex, eager",
            "sort_by_length": "false", "use_custom_sampler": "false"}
_FIELDS = {f.name: f for f in fields(TrainConfig)}
_DEFAULTS = asdict(TrainConfig())


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def load_section(name: str, config_dir: Path = CONFIG_DIR) -> dict:
    """One config section: `configs/NAME.yaml` holding `{NAME: {...}}` (or a path to such a file)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else config_dir / f"{name}.yaml"
    if not path.is_file():
        hint = did_you_mean(name, available_configs(config_dir), n=3, cutoff=0.5, quote=False)
        raise TrainConfigError(f"unknown config {name!r} (no {path}){hint} "
                               f"Available: {', '.join(available_configs(config_dir))}")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(document, dict) or len(document) != 1 or not isinstance(next(iter(document.values())), dict):
        raise TrainConfigError(f"{path}: expected exactly one section, {{{path.stem}: {{key: value, ...}}}}")
    section = next(iter(document.values()))
    for key in section:
        _check_key(key, where=str(path))
    return {key: _coerce(key, value, where=f"{path}: {key}") for key, value in section.items()}


def _check_key(key: str, where: str) -> None:
    if key not in _FIELDS:
        raise TrainConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, _FIELDS)}")


def _coerce(key: str, value: Any, where: str) -> Any:
    """A YAML value checked against the key's type (YAML reads `1e-5` as a string, for one)."""
    kind = _kind(key)
    if value is None or kind in (list, dict):
        return value
    if isinstance(value, str):
        return _typed(key, value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise TrainConfigError(f"{where}={value!r} should be a {kind.__name__}")
    return value


def _kind(key: str) -> type:
    """The value type of a key: its default's type, or for `X | None` keys the annotation's X."""
    default = _DEFAULTS[key]
    if default is not None:
        return type(default)
    return {"int": int, "float": float, "str": str}[_FIELDS[key].type.split("|")[0].strip()]


def _typed(key: str, text: str) -> Any:
    """A command-line string typed like the key (booleans, lists and dicts parse as YAML)."""
    kind = _kind(key)
    try:
        if kind in (bool, list, dict):
            value = yaml.safe_load(text)
            if not isinstance(value, kind):
                raise ValueError(f"expected a {kind.__name__}")
            return value
        return int(text, 0) if kind is int else kind(text)
    except (ValueError, yaml.YAMLError) as err:
        raise TrainConfigError(f"--{key} {text!r}: cannot be read as {kind.__name__} ({err})") from None


def _parse_overrides(tokens: list[str]) -> dict:
    """`--key value`, `--key=value`, a bare `--flag` (True for booleans) and `--no-key` (None)."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise TrainConfigError(f"unexpected argument {token!r} (overrides look like --key value)")
        name, has_value, value = token[2:].partition("=")
        if name.startswith("no-") and not has_value and name[3:].replace("-", "_") in _FIELDS:
            overrides[name[3:].replace("-", "_")] = None
            i += 1
            continue
        key = name.replace("-", "_")
        _check_key(key, where=f"--{name}")
        if not has_value:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if _kind(key) is bool and (following is None or following.startswith("--")):
                overrides[key] = True
                i += 1
                continue
            if following is None:
                raise TrainConfigError(f"--{name} needs a value")
            value, i = following, i + 1
        overrides[key] = _typed(key, value)
        i += 1
    return overrides


def build_parser() -> argparse.ArgumentParser:
    keys = ", ".join(_FIELDS)
    parser = argparse.ArgumentParser(
        description="Supervised fine-tuning of a GPT-NeoX model with an explicit DeepSpeed ZeRO-2 loop. "
                    "The loop always drives DeepSpeed (deepspeed.initialize with ds_config.json, its 'auto' "
                    "values resolved from the config); --deepspeed is accepted for compatibility with the "
                    "reference command and changes nothing.",
        epilog=f"Any config key can be overridden with --key value (typed like its default; lists and dicts "
               f"as YAML; --no-key sets it to None). Keys: {keys}. "
               f"Configs in {CONFIG_DIR}: {', '.join(available_configs())}.")
    parser.add_argument("--configs", nargs="+", default=["defaults"], metavar="NAME",
                        help="config sections merged left to right (default: defaults)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--deepspeed", action="store_true", help="accepted for compatibility; always on")
    return parser


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: sections merged left to right, then the overrides."""
    args, rest = build_parser().parse_known_args(argv)
    merged: dict = {}
    for name in args.configs:
        merged.update(load_section(name))
    merged.update(_parse_overrides(rest))
    if merged.get("datasets", []) is None:
        merged["datasets"] = []
    try:
        return TrainConfig(**merged)
    except TypeError as err:
        raise TrainConfigError(f"configs {args.configs}: {err}") from None
