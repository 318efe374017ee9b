"""The training configuration: one dataclass, YAML sections merged left to right, `--key value` overrides.

This mirrors the reference command line (`--configs defaults stablelm-7b oasst-mix --cache_dir ...`) so the
seed's launch command works unchanged, but every key is declared here: a typo fails in the first second
with a suggestion instead of being carried along silently.
"""
from __future__ import annotations

import argparse
import math
import sys
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gptneox.config import did_you_mean
from gptneox.dtypes import LONG_NAMES, TORCH_DTYPES
from gptneox.data.hub_datasets import is_hub_path
from gptneox.errors import UserError
from gptneox.lora import LoraConfig, parse_target_modules
from gptneox.training.reporting import requested_backends

# The bundled files (package data in an installed package; in a checkout, symlinks to the top-level
# configs/, ds_config.json and data/).
PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONFIG_DIR = PACKAGE_DIR / "configs"
# Keys naming files a section reads. Relative values are taken from the YAML file's folder (a bundled
# section's from the package) and from the working directory on the command line. Where a run writes
# (output_dir, log_dir) is always taken from the working directory.
INPUT_PATH_KEYS = ("cache_dir", "tokenizer_path", "deepspeed_config")


def repo_path(path: str | Path) -> Path:
    """A bundled file (`data/sample/tokenizer.json`, say) wherever the package is; an absolute path, such as
    a loaded section's resolved cache_dir, stays as it is."""
    return PACKAGE_DIR / path


class TrainConfigError(UserError, ValueError):
    """A bad configuration: the message names the config file or flag, the key and the value."""


# The groups of `--help`, in this order.
MODEL, LORA, DATA, OPTIMISATION, CHECKPOINTING, LOGGING = (
    "model", "LoRA", "data", "optimisation", "checkpointing", "logging and evaluation")
GROUPS = (MODEL, LORA, DATA, OPTIMISATION, CHECKPOINTING, LOGGING)


def setting(default: Any, group: str, meaning: str) -> Any:
    """A config key: its default, its `--help` group and its one-line meaning (kept in the field's metadata)."""
    metadata = {"group": group, "help": meaning}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


Dtype = Literal[tuple(TORCH_DTYPES)]  # the short names of gptneox.dtypes


@dataclass
class TrainConfig:
    """Every key a config section or a `--key value` flag may set; defaults follow the reference `defaults`."""

    model_name: str | None = setting(None, MODEL, "preset name (random init) or a local Hugging Face directory")
    tokenizer_path: str | None = setting(None, MODEL, "tokenizer.json or a directory; null: the model directory's")
    dtype: Dtype = setting("fp16", MODEL, "training precision: fp16 (DeepSpeed loss scaling), bf16 or fp32; "
                                          "float16, bfloat16, float32 mean the same")
    gradient_checkpointing: bool = setting(False, MODEL, "recompute each block in backward to save activation memory")
    use_flash_attention: bool = setting(False, MODEL, "flash-attn kernels (CUDA, fp16/bf16); checked at start-up")
    attention_backend: Literal["sdpa", "flash", "flex", "eager"] | None = setting(
        None, MODEL, "attention kernels; null: flash if use_flash_attention, else sdpa")
    compile: bool = setting(False, MODEL, "torch.compile each block, attention kernels excluded (needs a C++ "
                                          "compiler on CPU; off: no gain on CPU, docs/benchmarks.md)")
    deterministic: bool = setting(False, MODEL, "deterministic kernels (flash backward, cuBLAS): bitwise resume on GPU")

    lora_r: int = setting(0, LORA, "LoRA rank: train low-rank adapters on a frozen base model; 0 trains every "
                                   "weight (full fine-tuning)")
    lora_alpha: float = setting(8.0, LORA, "LoRA scaling numerator: the update is (B @ A) * lora_alpha / lora_r")
    lora_dropout: float = setting(0.0, LORA, "dropout on the adapters' input, in [0, 1)")
    lora_target_modules: str | list[str] = setting(
        "query_key_value", LORA, "projections that get adapters: query_key_value, dense, dense_h_to_4h, "
                                 "dense_4h_to_h (a comma list or a YAML list), or all-linear for all four")
    lora_train_new_tokens: bool = setting(True, LORA, "with LoRA, also train the embedding rows (input and output) "
                                                      "of the chat tokens the tokenizer adds to the base vocabulary")

    datasets: list[str | dict] = setting([], DATA,
                                         "dataset names or {name: options} mappings (YAML on the command line); "
                                         "input_file_path may be an hf://datasets/ORG/NAME[/PATH] in the "
                                         "Hugging Face cache")
    cache_dir: str = setting(".cache", DATA, "where dataset files and model directories are looked for (a YAML "
                                             "file that sets no cache_dir: its input_file_paths are relative to it; "
                                             "a stock dataset file missing: in its hub repo in the Hugging Face cache)")
    max_length: int = setting(512, DATA, "longest training sequence in tokens (a random window of longer ones)")
    val_max_length: int | None = setting(None, DATA, "longest evaluation sequence; null: max_length")
    random_offset_probability: float = setting(0.8, DATA, "chance that a too-long conversation gets a random window")
    pad_to_multiple_of: int = setting(16, DATA, "row widths are rounded up to a multiple of this")
    pack: bool = setting(False, DATA, "a micro-batch's conversations end to end in one row, no attention across them")
    eval_size: int | None = setting(None, DATA, "keep only the first N samples of every evaluation set")
    sort_by_length: bool = setting(False, DATA, "reference option; only false is implemented")
    use_custom_sampler: bool = setting(False, DATA, "reference option; only false is implemented")

    rng_seed: int = setting(0xA1221F97, OPTIMISATION, "seed of the data order, the random windows and the init")
    learning_rate: float = setting(1e-5, OPTIMISATION, "peak learning rate of WarmupDecayLR")
    weight_decay: float = setting(0.0, OPTIMISATION, "AdamW weight decay of the matrices (not biases or LayerNorms)")
    adam_beta1: float = setting(0.9, OPTIMISATION, "AdamW beta1")
    adam_beta2: float = setting(0.95, OPTIMISATION, "AdamW beta2")
    adam_epsilon: float = setting(1e-12, OPTIMISATION, "AdamW epsilon")
    warmup_steps: int = setting(600, OPTIMISATION, "optimizer steps of learning-rate warm-up")
    max_grad_norm: float = setting(2.0, OPTIMISATION, "gradient clipping norm")
    num_train_epochs: float = setting(3, OPTIMISATION, "passes over the training set; a fraction (0.5) ends "
                                                       "the run part-way, after ceil(epochs x steps/epoch) steps")
    max_steps: int | None = setting(None, OPTIMISATION,
                                    "stop after this many optimizer steps (also the schedule length)")
    per_device_train_batch_size: int = setting(2, OPTIMISATION, "conversations per micro-batch and rank")
    gradient_accumulation_steps: int = setting(32, OPTIMISATION, "micro-batches per optimizer step")
    max_consecutive_skipped_steps: int = setting(20, OPTIMISATION,
                                             "optimizer steps in a row skipped for fp16 overflow before stopping")
    deepspeed_config: str = setting("ds_config.json", OPTIMISATION, "DeepSpeed JSON; its \"auto\" values are filled")

    output_dir: str = setting("saved_model", CHECKPOINTING, "run directory: checkpoints, metrics, the exported model")
    save_strategy: Literal["steps", "epoch"] = setting("steps", CHECKPOINTING,
                                                   "save every save_steps steps, or at every epoch end")
    save_steps: int = setting(1000, CHECKPOINTING, "optimizer steps between checkpoints (save_strategy steps)")
    save_total_limit: int | None = setting(4, CHECKPOINTING, "complete checkpoints kept; null keeps all")
    resume: bool = setting(False, CHECKPOINTING, "continue from the newest complete checkpoint in output_dir")
    overwrite_output_dir: bool = setting(False, CHECKPOINTING,
                                         "delete another run's checkpoints, metrics and model in output_dir first")
    trust_checkpoint_code: bool = setting(False, CHECKPOINTING,
                                          "load the resumed checkpoint's .pt files unchecked: code in them runs "
                                          "(only for checkpoints you trust; see README, Faults)")
    allow_changed: str | None = setting(None, CHECKPOINTING,
                                        "resume checks to waive, comma-separated (e.g. learning_rate,total_steps)")

    report_to: str | list[str] = setting("none", LOGGING, "where the figures go besides metrics.jsonl (always "
                                         "written): tensorboard, wandb, all (those installed) or none; "
                                         "one name, a comma list or a YAML list")
    log_dir: str | None = setting(None, LOGGING, "TensorBoard directory (report_to tensorboard); "
                                                 "null: OUTPUT_DIR/tensorboard")
    logging_steps: int = setting(10, LOGGING, "progress-bar refresh; metrics.jsonl gets every step")
    eval_strategy: Literal["no", "steps", "epoch"] = setting(
        "steps", LOGGING, "evaluate every eval_steps steps, or at every epoch end (either: and after the last "
                          "step), or never (no)")
    eval_steps: int = setting(200, LOGGING, "optimizer steps between evaluations (eval_strategy steps)")
    per_device_eval_batch_size: int = setting(2, LOGGING, "evaluation conversations per batch and rank")
    peak_tflops: float | None = setting(None, LOGGING,
                                        "accelerator peak TFLOP/s for MFU; null: known-GPU table or measured")

    def __post_init__(self) -> None:
        self.dtype = LONG_NAMES.get(self.dtype, self.dtype)  # float16 -> fp16, ...
        try:
            self.report_to = requested_backends(self.report_to)  # names, never "all" or "none"
        except ValueError as err:
            raise TrainConfigError(f"report_to={self.report_to!r}: {err}") from None
        for name, (_, choices) in _TYPES.items():
            if choices and getattr(self, name) not in (*choices, None):
                hint = f"; {_KEY_HINTS[name]}" if name in _KEY_HINTS else ""
                raise TrainConfigError(f"{name}={getattr(self, name)!r} is not supported "
                                       f"(allowed: {', '.join(map(str, choices))}){hint}")
        for name in ("sort_by_length", "use_custom_sampler"):
            if getattr(self, name):
                raise TrainConfigError(f"{name}={getattr(self, name)!r} is not supported (allowed: false)")
        for name, (low, high, rule) in _RANGES.items():
            value = getattr(self, name)
            if value is not None and (not low <= value <= high or (isinstance(value, float) and not math.isfinite(value))):
                hint = f"; {_KEY_HINTS[name]}" if name in _KEY_HINTS else ""
                raise TrainConfigError(f"{name}={value!r} must be {rule}{hint}")
        for name in POSITIVE:
            if getattr(self, name) == 0:
                raise TrainConfigError(f"{name}={getattr(self, name)!r} must be positive")
        try:
            self.lora_target_modules = list(parse_target_modules(self.lora_target_modules))
        except ValueError as err:
            raise TrainConfigError(f"lora_target_modules={self.lora_target_modules!r}: {err}") from None
        for name in _FIELDS:
            if getattr(self, name) is None and name not in _NULLABLE:
                raise TrainConfigError(_null_refused(name, name))

    @property
    def allowed_changes(self) -> set[str]:
        return {name.strip() for name in (self.allow_changed or "").split(",") if name.strip()}

    @property
    def lora(self) -> LoraConfig | None:
        """The adapters' settings; None for full fine-tuning (lora_r 0)."""
        if not self.lora_r:
            return None
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          target_modules=tuple(self.lora_target_modules))

    @property
    def eval_max_length(self) -> int:
        return self.val_max_length or self.max_length

    def to_yaml(self) -> str:
        return yaml.safe_dump({"train": asdict(self)}, sort_keys=False)


def _value_type(hint: Any) -> tuple[type, tuple | None]:
    """(the type a value must have, the allowed values of a Literal) of a field's annotation: `X | None`
    is X (null is always accepted), `list[...]` is list (`str | list[str]`, too: one name stands for a list
    of one), `Literal["a", "b"]` is str with its choices."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in get_args(hint) if arg is not type(None)]
        hint = next((arg for arg in args if get_origin(arg) is list), args[0])
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        return type(choices[0]), choices
    return get_origin(hint) or hint, None


# floats that must not be 0
POSITIVE = ("learning_rate", "adam_epsilon", "peak_tflops", "num_train_epochs", "lora_alpha")
# Every numeric key's allowed range (low, high, as said in the error); null is always allowed where the
# type has it. save_total_limit 0 would delete every checkpoint, the final one included.
_AT_LEAST_1 = (1, math.inf, "at least 1")
_RANGES = {
    **{name: _AT_LEAST_1 for name in (
        "pad_to_multiple_of", "eval_size", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "max_steps",
        "max_consecutive_skipped_steps", "save_steps", "save_total_limit", "logging_steps", "eval_steps")},
    **{name: (2, math.inf, "at least 2 (a token and its target)") for name in ("max_length", "val_max_length")},
    "rng_seed": (0, 2**64 - 1, "in [0, 2**64)"),
    "warmup_steps": (0, math.inf, "0 or more"),
    "random_offset_probability": (0.0, 1.0, "in [0, 1]"),
    "adam_beta1": (0.0, 1.0 - 1e-12, "in [0, 1)"),
    "lora_r": (0, math.inf, "0 (LoRA off) or more"),
    "lora_dropout": (0.0, 1.0 - 1e-12, "in [0, 1)"),
    "adam_beta2": (0.0, 1.0 - 1e-12, "in [0, 1)"),
    **{name: (0.0, math.inf, "a finite number, 0 or more") for name in ("weight_decay", "max_grad_norm")},
    **{name: (0.0, math.inf, "a finite positive number") for name in POSITIVE},
}
_FIELDS = {f.name: f for f in fields(TrainConfig)}
_TYPES = {name: _value_type(hint) for name, hint in get_type_hints(TrainConfig).items()}
_NULLABLE = {name for name, hint in get_type_hints(TrainConfig).items() if type(None) in get_args(hint)}

# What to add when a key gets a value it cannot take (null, or out of range).
_KEY_HINTS = {"eval_steps": "to switch evaluation off: eval_strategy no", "datasets": "an empty list is []",
              "report_to": "for no backend: report_to none",
              "save_strategy": "the last step is always saved; a save_steps beyond the run's length saves only that"}

# Arguments of the Hugging Face Trainer, TRL and axolotl that are not keys here, and what does their job.
FOREIGN_KEYS = {
    "bf16": "the precision is one key here: --dtype bf16",
    "fp16": "the precision is one key here: --dtype fp16 (the defaults section's, for GPUs)",
    "lr_scheduler_type": "the learning-rate schedule is the DeepSpeed config's 'scheduler' section "
                         "(ds_config.json: WarmupDecayLR, filled from learning_rate, warmup_steps and the run's "
                         "length); to change it, copy ds_config.json, set scheduler.type to WarmupLR (constant "
                         "after warm-up) or WarmupCosineLR, and pass --deepspeed_config YOUR_COPY.json",
    "warmup_ratio": "warm-up is counted in optimizer steps here: --warmup_steps N",
    "resume_from_checkpoint": "use --resume: it continues the run in output_dir from its newest complete "
                              "checkpoint (data position and optimizer state included), so it takes no path; "
                              "to start a new run from another run's exported model, pass --model_name DIR",
    "seed": "the one seed (data order, random windows, init) is --rng_seed",
    "data_seed": "the one seed (data order, random windows, init) is --rng_seed",
    "logging_dir": "TensorBoard's directory is --log_dir (default OUTPUT_DIR/tensorboard)",
    "evaluation_strategy": "the Trainer's newer name is the key here: --eval_strategy no|steps|epoch",
    "model_name_or_path": "use --model_name (a preset, a local directory or an org/name in the HF cache)",
    "base_model": "use --model_name (a preset, a local directory or an org/name in the HF cache)",
    "tokenizer_name": "use --tokenizer_path (a tokenizer.json or a directory holding one)",
    "max_seq_length": "use --max_length", "sequence_len": "use --max_length",
    "micro_batch_size": "use --per_device_train_batch_size", "num_epochs": "use --num_train_epochs",
    "packing": "use --pack", "sample_packing": "use --pack", "torch_compile": "use --compile true",
    "model": "use --model_name", "lr": "use --learning_rate", "epochs": "use --num_train_epochs",
    "torch_dtype": "use --dtype fp32|fp16|bf16",
    "eval_batch_size": "use --per_device_eval_batch_size",
    "batch_size": "the batch is --per_device_train_batch_size conversations per rank, times "
                  "--gradient_accumulation_steps",
    "optim": "the optimizer is AdamW, the DeepSpeed config's 'optimizer' section, filled from --learning_rate, "
             "--adam_beta1, --adam_beta2, --adam_epsilon and --weight_decay",
    "logging_strategy": "metrics.jsonl records every step; --logging_steps only sets how often the progress "
                        "bar refreshes",
    "logging_first_step": "metrics.jsonl records every step, the first included",
    "eval_accumulation_steps": "evaluation keeps running sums only, never a batch's logits: nothing to accumulate",
    "val_set_size": "the evaluation split is set per dataset: val_split (a fraction) and max_val_set in its "
                    "options (--datasets, or a YAML section)",
    "group_by_length": "length grouping is not implemented (--sort_by_length accepts only false); --pack "
                       "removes the padding instead",
    "gradient_checkpointing_kwargs": "--gradient_checkpointing true takes no options (each block is recomputed)",
    **dict.fromkeys(("train_on_inputs", "assistant_only_loss", "completion_only_loss", "dataset_text_field"),
                    "only the assistant turns are trained, always: the collator masks every other token out of "
                    "the loss, and each dataset's source (chat, vicuna, alpaca, ...) says which turns are which"),
    "chat_template": "the chat format is fixed: <|system|>, <|prompter|> and <|assistant|> turns ended by "
                     "<|endoftext|>, as the seed model was trained; the export writes the matching chat template",
    "neftune_noise_alpha": "NEFTune (noise on the embeddings) is not implemented",
    "run_name": "W&B names the run after the output directory; set WANDB_NAME to change it",
    "push_to_hub": "nothing leaves the machine: upload the exported model yourself (hf upload ORG/NAME "
                   "OUTPUT_DIR)",
    **dict.fromkeys(("do_train", "do_eval"), "train.py always trains; evaluation is --eval_strategy "
                                             "no|steps|epoch"),
    "load_best_model_at_end": "the export is the last step's model; checkpoints are kept per "
                              "--save_total_limit, and tools/export_hf.py exports any of them (its tag option)",
    "save_safetensors": "exports are always safetensors (checkpoints are DeepSpeed's own files)",
    "dataloader_num_workers": "batches are made in the training process: there are no loader workers to set",
}
SUGGESTION_CUTOFF = 0.75  # below it, the nearest key was more often wrong (logging_strategy -> logging_steps)


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def section_path(name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """The YAML file of a section: a path ending in .yaml/.yml, else the bundled `configs/NAME.yaml`."""
    return Path(name) if name.endswith((".yaml", ".yml")) else config_dir / f"{name}.yaml"


def users_folder(path: Path) -> Path | None:
    """The folder of a user's YAML file; None for a bundled section."""
    folder = path.resolve().parent
    return None if folder == CONFIG_DIR.resolve() else folder


def load_section(name: str, config_dir: Path = CONFIG_DIR) -> dict:
    """One config section: `configs/NAME.yaml` holding `{NAME: {...}}` (or a path to such a file)."""
    path = section_path(name, config_dir)
    if not path.is_file():
        hint = did_you_mean(name, available_configs(config_dir), n=3, cutoff=0.5, quote=False)
        raise TrainConfigError(f"unknown config {name!r} (no {path}){hint} "
                               f"Available: {', '.join(available_configs(config_dir))}")
    try:
        document = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise TrainConfigError(f"{path}: invalid YAML: {_one_line(err)}") from None
    flat = [key for key, value in document.items() if not isinstance(value, dict) and
            (key in _FIELDS or key in FOREIGN_KEYS)] if isinstance(document, dict) else []  # axolotl's layout
    if flat:
        raise TrainConfigError(f"{path}: training keys at its top level ({', '.join(map(str, flat))}); a YAML file "
                               f"holds one section: indent the keys under a name of your choosing, as in "
                               f"'{path.stem}:' followed by '  {flat[0]}: ...'")
    if isinstance(document, dict) and len(document) > 1:
        raise TrainConfigError(f"{path}: holds {len(document)} sections ({', '.join(map(str, document))}); a YAML "
                               "file holds one: put each in its own file and list the files in --configs")
    if not isinstance(document, dict) or len(document) != 1 or not isinstance(next(iter(document.values())), dict):
        raise TrainConfigError(f"{path}: expected exactly one section, {{{path.stem}: {{key: value, ...}}}}")
    section = next(iter(document.values()))
    for key in section:
        _check_key(key, where=str(path))
    values = {key: _coerce(key, value, where=f"{path}: {key}") for key, value in section.items()}
    base = users_folder(path) or PACKAGE_DIR
    for key in INPUT_PATH_KEYS:
        if isinstance(values.get(key), str):
            values[key] = str(base / Path(values[key]).expanduser())
    return values


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message (several lines, with a caret under a copy of the line) as problem and position."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())
    context = f"{err.context} " if getattr(err, "context", None) else ""
    return f"{context}{problem} (line {mark.line + 1}, column {mark.column + 1})"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_key(key: str, where: str) -> None:
    if not isinstance(key, str):
        raise TrainConfigError(f"{where}: key {key!r} is not a name (YAML reads it as {type(key).__name__})")
    if key in _FIELDS:
        return
    if key in FOREIGN_KEYS:
        raise TrainConfigError(f"{where}: {key!r} is not a key here; {FOREIGN_KEYS[key]}")
    raise TrainConfigError(f"{where}: unknown key {key!r}{did_you_mean(key, _FIELDS, cutoff=SUGGESTION_CUTOFF)}")


def _null_refused(where: str, key: str) -> str:
    """The error of a null (YAML null, --no-KEY) for a key whose type has no null; `where` ends with the key."""
    hint = f"; {_KEY_HINTS[key]}" if key in _KEY_HINTS else ""
    return f"{where} cannot be null (it takes {_type_name(key)}){hint}"


def _coerce(key: str, value: Any, where: str) -> Any:
    """A YAML value checked against the key's type (YAML reads `1e-5` as a string, for one)."""
    kind = _kind(key)
    if value is None and key not in _NULLABLE:
        raise TrainConfigError(_null_refused(where, key))
    choices = _TYPES[key][1]
    if value is False and choices and "no" in choices:  # YAML 1.1 reads a bare `no` as false
        return "no"
    if isinstance(value, bool) and choices:
        raise TrainConfigError(f"{where}={value!r} (YAML reads a bare no, yes, off or on as a boolean) is not "
                               f"supported (allowed: {', '.join(map(str, choices))})")
    if value is None or kind in (list, dict):
        return value
    if isinstance(value, str):
        return _typed(key, value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is Path:
        return value
    if type(value) is not kind:
        raise TrainConfigError(f"{where}={value!r} should be a {kind.__name__}")
    return value


def _kind(key: str) -> type:
    return _TYPES[key][0]


def _one_or_many(key: str) -> bool:
    """A `str | list[str]` key, such as report_to: one name or a list of them."""
    args = get_args(get_type_hints(TrainConfig)[key])
    return str in args and any(get_origin(arg) is list for arg in args)


def _typed(key: str, text: str) -> Any:
    """A command-line string typed like the key (booleans, lists and dicts parse as YAML)."""
    kind = _kind(key)
    try:
        if kind in (bool, list, dict):
            value = yaml.safe_load(text)
            if kind is list and isinstance(value, str) and _one_or_many(key):
                return value
            if not isinstance(value, kind):
                raise ValueError(f"expected a {kind.__name__}")
            return value
        if kind is int:
            try:
                return int(text, 0)
            except ValueError:
                raise ValueError("expected a whole number") from None
        return kind(text)  # str, float, Path
    except (ValueError, yaml.YAMLError) as err:
        raise TrainConfigError(f"--{key} {text!r}: cannot be read as {kind.__name__} ({err})") from None


def _parse_overrides(tokens: list[str]) -> dict:
    """`--key value`, `--key=value`, a bare `--flag` (True for booleans), `--no-flag` (False for booleans)
    and `--no-key` (None for the other keys)."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            ds_config = ("; a DeepSpeed config is --deepspeed_config FILE (--deepspeed, the Trainer's way, takes no "
                         "value here)") if token.endswith(".json") else ""
            raise TrainConfigError(f"unexpected argument {token!r} (overrides look like --key value){ds_config}")
        name, has_value, value = token[2:].partition("=")
        negated = name[3:].replace("-", "_")
        if name.startswith("no-") and not has_value and negated in _FIELDS:
            if _kind(negated) is not bool and negated not in _NULLABLE:
                raise TrainConfigError(_null_refused(f"--{name}: {negated}", negated))
            overrides[negated] = False if _kind(negated) is bool else None
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


def _input_paths_from(datasets: Any, folder: Path) -> Any:
    """`datasets` with each relative input_file_path taken from `folder`: a user's YAML file that sets no
    cache_dir names its data files relative to itself, as it does its tokenizer_path."""
    if not isinstance(datasets, list):
        return datasets  # a wrong shape is reported, with its dataset, where the datasets are read

    def resolved(spec: Any) -> Any:
        if isinstance(spec, list):
            return [resolved(item) for item in spec]
        if not isinstance(spec, str) or is_hub_path(spec):  # hf://datasets/... is not a local path
            return spec
        return str(folder / Path(spec).expanduser())

    return [{name: {**options, "input_file_path": resolved(options["input_file_path"])}
             if isinstance(options, dict) and "input_file_path" in options else options
             for name, options in entry.items()} if isinstance(entry, dict) else entry
            for entry in datasets]


DESCRIPTION = ("Supervised fine-tuning of a GPT-NeoX model with an explicit DeepSpeed ZeRO-2 loop. The loop "
               "always drives DeepSpeed (deepspeed.initialize with ds_config.json, its 'auto' values resolved "
               "from the config); --deepspeed is accepted for compatibility with the reference command and "
               "changes nothing.")


def _launch_parser(**kwargs) -> argparse.ArgumentParser:
    """The flags that are not config keys: which sections, and what the deepspeed launcher adds."""
    parser = argparse.ArgumentParser(**kwargs)
    parser.add_argument("--configs", nargs="+", default=["defaults"], metavar="NAME",
                        help="config sections merged left to right (default: defaults)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--deepspeed", action="store_true", help="accepted for compatibility; always on")
    return parser


def _type_name(name: str) -> str:
    kind, choices = _TYPES[name]
    names = {list: "YAML-LIST", dict: "YAML-MAP"}
    text = "|".join(map(str, choices)) if choices else names.get(kind, kind.__name__.upper())
    if _one_or_many(name):
        text = "NAME|" + text
    return text + "|null" if name in _NULLABLE else text


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line as `--help` shows it: every config key by group, with its type, default and meaning,
    read from TrainConfig. (Parsing the keys is _parse_overrides's: bare booleans, --no-KEY, YAML values.)"""
    parser = _launch_parser(
        prog=prog, usage="%(prog)s [--configs NAME [NAME ...]] [--KEY VALUE ...]", description=DESCRIPTION,
        epilog="Any config key can be overridden with --key value or --key=value (lists and dicts as YAML; a "
               "bare --flag sets a boolean true; --no-flag sets it false; --no-key sets any other key to null). "
               f"Configs in {CONFIG_DIR}: {', '.join(available_configs())}.")
    defaults = asdict(TrainConfig())  # list defaults are made by a factory
    for group in GROUPS:
        section = parser.add_argument_group(f"{group} keys")
        for f in fields(TrainConfig):
            if f.metadata["group"] == group:
                default = defaults[f.name] if f.default is MISSING else f.default  # as written: none, not []
                section.add_argument(f"--{f.name}", metavar=_type_name(f.name),
                                     help=f"{f.metadata['help']} (default: {_yaml_value(default)})")
    return parser


def parse_train_config(argv: list[str] | None = None, prog: str | None = None) -> TrainConfig:
    """Command line -> TrainConfig: sections merged left to right, then the overrides. `prog` names the
    command in `--help` (argparse's default: the script's name)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser(prog).parse_args(["--help"])  # prints the grouped keys and exits
    args, rest = _launch_parser(add_help=False).parse_known_args(argv)
    merged: dict = {"deepspeed_config": str(PACKAGE_DIR / _FIELDS["deepspeed_config"].default)}  # the bundled one
    data_folder = None  # the folder of the user's YAML file whose datasets the run reads
    for name in args.configs:
        section = load_section(name)
        if "datasets" in section:
            data_folder = users_folder(section_path(name))
        merged.update(section)
    overrides = _parse_overrides(rest)
    if "datasets" in overrides:
        data_folder = None
    merged.update(overrides)
    if data_folder is not None and "cache_dir" not in merged:
        merged["datasets"] = _input_paths_from(merged["datasets"], data_folder)
    try:
        return TrainConfig(**merged)
    except TypeError as err:
        raise TrainConfigError(f"configs {args.configs}: {err}") from None
