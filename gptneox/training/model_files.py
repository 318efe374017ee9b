"""Where a run's model, tokenizer and data files are. No torch model code and no DeepSpeed here, so data tools
(tools/data_report.py) find the run's tokenizer exactly as training does, in a second."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from gptneox.config import PRESETS
from gptneox.data import load_tokenizer
from gptneox.data.datasets import input_files as dataset_input_files
from gptneox.data.datasets import parse_entry
from gptneox.data.tokenizer import added_token_ids
from gptneox.hub import find_model, is_repo_id
from gptneox.training.config import PACKAGE_DIR, TrainConfig, TrainConfigError, repo_path

SAMPLE_TOKENIZER = "data/sample/tokenizer.json"  # bundled; configs/sample-tokenizer.yaml names it


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
    # a bundled section's cache_dir (sample-mix's) is inside the installed package: no place for a user's files
    bundled = any(path.is_relative_to(PACKAGE_DIR) for path in (Path(cache_dir).absolute(), Path(cache_dir).resolve()))
    place = "" if bundled else \
        f"put them in {Path(cache_dir) / model_name}, "
    raise TrainConfigError(
        f"model_name={model_name!r}: no model directory and not a preset ({', '.join(PRESETS)}). "
        f"Looked at: {'; '.join(looked)}. Nothing is downloaded: the Hugging Face files (config.json, "
        f"*.safetensors or pytorch_model*.bin, tokenizer.json) are needed; {place}{fetch}"
        f"or set model_name to the directory's path")


def run_tokenizer_source(cfg: TrainConfig) -> Path:
    """Where the run's tokenizer is read from: `tokenizer_path`, else the model directory."""
    source = cfg.tokenizer_path or find_model_dir(cfg.model_name, cfg.cache_dir)
    if source is None:
        raise TrainConfigError(
            f"model_name={cfg.model_name!r} is a preset (random weights, no files), so it has no tokenizer: add the "
            f"bundled section sample-tokenizer to --configs (the sample tokenizer, {repo_path(SAMPLE_TOKENIZER)}), "
            "or set tokenizer_path to a tokenizer.json or a directory holding one, such as a Hugging Face GPT-NeoX "
            "model directory (EleutherAI/pythia-70m ... pythia-12b, stabilityai/stablelm-base-alpha-3b/7b all carry "
            "the GPT-NeoX-20B tokenizer.json)")
    return Path(source)


def load_run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The tokenizer a run trains with: `tokenizer_path`, else the model directory's (data tools use it too)."""
    return load_tokenizer(run_tokenizer_source(cfg))


def input_directories(cfg: TrainConfig) -> dict[str, Path]:
    """What a run reads from, by the key that names it: the model directory, the tokenizer's directory,
    cache_dir and each dataset file's folder. Its output_dir may be none of them (gptneox.training.output_dir)."""
    inputs = {"cache_dir": Path(cfg.cache_dir)}
    model_dir = find_model_dir(cfg.model_name, cfg.cache_dir)
    if model_dir is not None:
        inputs["model_name"] = model_dir
    if cfg.tokenizer_path:
        tokenizer = Path(cfg.tokenizer_path)
        inputs["tokenizer_path"] = tokenizer if tokenizer.is_dir() else tokenizer.parent
    for entry in cfg.datasets if isinstance(cfg.datasets, list) else []:  # else load_datasets says why
        name, options = parse_entry(entry)
        for path in dataset_input_files(name, options, cfg.cache_dir):
            inputs.setdefault(f"dataset {name} ({path.name})", path.parent)
    return inputs


def trained_token_ids(cfg: TrainConfig) -> list[int]:
    """The tokens whose embedding rows a LoRA run trains: with lora_train_new_tokens, those the tokenizer
    adds to the stored vocabulary (the chat tokens, on a base model); none otherwise."""
    return added_token_ids(run_tokenizer_source(cfg)) if cfg.lora_r and cfg.lora_train_new_tokens else []
