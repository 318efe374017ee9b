"""A LoRA adapter directory in peft's own format: `adapter_config.json` + `adapter_model.safetensors`.

peft names a tensor `base_model.model.` + the parameter name in transformers' GPTNeoXForCausalLM, which
since transformers 5 calls the LM head `lm_head` (it reads and writes `embed_out` in model files only);
our names are the same without the prefix and with `embed_out`. The trained token rows are peft's
`trainable_token_indices` ({"embed_in": ids, "lm_head": ids}). `PeftModel.from_pretrained(base, DIR)` loads
what save_adapter writes; load_adapter reads that and adapters peft trained (with our projections' names).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptneox.errors import MissingFileError, UserError
from gptneox.lora import TARGET_MODULES, LoraConfig, is_adapter_name, merged_weight
from gptneox.model import GPTNeoX

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD, PEFT_HEAD = "embed_out.", "lm_head."


class AdapterError(UserError, ValueError):
    """An adapter directory that cannot be read, or that does not fit the base model."""


def save_adapter(directory: str | Path, config: LoraConfig, tensors: dict[str, torch.Tensor],
                 token_ids: list[int], base_model: str | None) -> Path:
    """Write `tensors` (add_lora's names, adapters only) as a peft LoRA adapter of `base_model`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "trainable_token_indices": {"embed_in": list(token_ids), "lm_head": list(token_ids)} if token_ids else None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    on_disk = {PREFIX + _peft_name(name): t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(on_disk, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def _peft_name(name: str) -> str:
    return PEFT_HEAD + name.removeprefix(HEAD) if name.startswith(HEAD) else name


def _our_name(key: str) -> str:
    name = key.removeprefix(PREFIX)
    return HEAD + name.removeprefix(PEFT_HEAD) if name.startswith(PEFT_HEAD) else name


def load_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], list[int]]:
    """(settings, tensors by our names, trained token ids) of a peft LoRA adapter directory."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingFileError(f"{path} not found: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        peft = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: unreadable ({err})") from None
    unsupported = {"peft_type": "LORA", "use_dora": False, "bias": "none", "fan_in_fan_out": False,
                   "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    for key, supported in unsupported.items():
        if peft.get(key, supported) not in (supported, [], None) or (key == "peft_type" and peft.get(key) != "LORA"):
            raise AdapterError(f"{config_path}: {key}={peft.get(key)!r} is not supported (only {supported!r})")
    r, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterError(f"{config_path}: r={r!r} and lora_alpha={alpha!r} must be positive")
    tensors = {_our_name(k): v for k, v in load_file(str(weights_path)).items()}
    unknown = sorted(name for name in tensors if not is_adapter_name(name))
    if unknown:
        raise AdapterError(f"{weights_path}: tensors that are not LoRA adapters or token rows: "
                           f"{', '.join(unknown[:5])}")
    targets = tuple(t for t in TARGET_MODULES if any(f".{t}.lora_A." in name for name in tensors))
    # use_rslora scales by alpha / sqrt(r): an alpha giving that scaling with our alpha / r
    alpha = alpha * math.sqrt(r) if peft.get("use_rslora") else alpha
    config = LoraConfig(r=r, alpha=float(alpha), dropout=float(peft.get("lora_dropout") or 0.0),
                        target_modules=targets)  # the projections its tensors adapt
    indices = peft.get("trainable_token_indices") or []
    lists = list(indices.values()) if isinstance(indices, dict) else [indices]
    if any(ids != lists[0] for ids in lists):
        raise AdapterError(f"{config_path}: trainable_token_indices={indices!r}: only the same tokens in every "
                           "embedding are supported")
    return config, tensors, list(lists[0])


def apply_adapter(model: GPTNeoX, directory: str | Path) -> LoraConfig:
    """Fold the adapter in `directory` into `model`'s weights (for inference). An adapter made for a base
    of another shape is an AdapterError naming both shapes."""
    config, tensors, token_ids = load_adapter(directory)
    parameters = dict(model.named_parameters())
    for name, tensor in tensors.items():  # every adapter must fit the weight it changes
        module, _, leaf = name.rpartition(".")
        base_name = module.rpartition(".")[0] + ".weight" if leaf == "weight" else \
            module.removesuffix(".token_adapter") + ".weight"
        if base_name not in parameters:
            raise AdapterError(f"{directory}: {name} adapts {base_name}, which the base model does not have "
                               f"({model.config.num_hidden_layers} layers)")
        rows, cols = parameters[base_name].shape
        expected = {"lora_A": (config.r, cols), "lora_B": (rows, config.r)}.get(
            module.rpartition(".")[2], (len(token_ids), cols))
        if tuple(tensor.shape) != expected:
            raise AdapterError(f"{directory}: {name} has shape {list(tensor.shape)}, the base model's "
                               f"{base_name} {list(parameters[base_name].shape)} needs {list(expected)}: the "
                               "adapter was trained on a base of another shape")
    if token_ids and max(token_ids) >= model.config.vocab_size:
        raise AdapterError(f"{directory}: trains token id {max(token_ids)}, the base model has "
                           f"{model.config.vocab_size} embedding rows")
    with torch.no_grad():
        for name, parameter in parameters.items():
            merged = merged_weight(name, parameter, tensors, config.scaling, token_ids)
            if merged is not parameter:
                parameter.copy_(merged.to(parameter.dtype))
    return config
