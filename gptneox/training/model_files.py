"""Where a run's model and tokenizer files are. No torch model code and no DeepSpeed here, so data tools
(tools/data_report.py) find the run's tokenizer exactly as training does, in a second."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from gptneox.config import PRESETS
from gptneox.data import load_tokenizer
from gptneox.data.tokenizer import added_token_ids
from gptneox.hub import find_model, is_repo_id
from gptneox.training.config import TrainConfig, TrainConfigError


def find_model_dir(model_name: str, cache_dir: str) -> Path | None:
    """A local Hugging Face directory for `model_name`: relative to cwd (or absolute), relative to
    cache_dir, or for an `org/name` id the newest complete snapshot in the Hugging Face cache; None for a
    preset name; an error naming every place looked at otherwise. Nothing is downloaded."""
    if not model_name:
        raise TrainConfigError("model_name is not set (add a model config such as tiny or stablelm-7b)")
    path, looked = find_model(model_name, [Path.cwd(), Path(cache_dir)])
    if path is not None or model_name in PRESETS:
        return path
    fetch = f"fetch them into the Hugging Face cache beforehand (hf download {model_name}), " \
        if is_repo_id(model_name) else ""
    raise TrainConfigError(
        f"model_name={model_name!r}: no model directory and not a preset ({', '.join(PRESETS)}). "
        f"Looked at: {'; '.join(looked)}. Nothing is downloaded: put the Hugging Face files (config.json, "
        f"*.safetensors or pytorch_model*.bin, tokenizer.json) in {Path(cache_dir) / model_name}, "
        f"{fetch}or set model_name to the directory's path")


def tokenizer_source(cfg: TrainConfig) -> Path:
    """The tokenizer file or directory of a run: `tokenizer_path`, else the model directory."""
    source = cfg.tokenizer_path or find_model_dir(cfg.model_name, cfg.cache_dir)
    if source is None:
        raise TrainConfigError(f"model_name={cfg.model_name!r} is a preset without files: set tokenizer_path")
    return Path(source)


def load_run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The tokenizer a run trains with: `tokenizer_path`, else the model directory's (data tools use it too)."""
    return load_tokenizer(tokenizer_source(cfg))


def trained_token_ids(cfg: TrainConfig) -> list[int]:
    """The tokens whose embedding rows a LoRA run trains: with lora_train_new_tokens, those the tokenizer
    adds to the stored vocabulary (the chat tokens, on a base model); none otherwise."""
    return added_token_ids(tokenizer_source(cfg)) if cfg.lora_r and cfg.lora_train_new_tokens else []
