"""DeepSpeed ZeRO checkpoint -> Hugging Face model directory (config.json with the pad id, safetensors,
tokenizer files with the chat template, generation_config.json with the chat's stop ids and sampling).

The weights are the fp32 master copy gathered from the ZeRO partitions (not the fp16 module copy), cast
to the training dtype or a chosen one; under ZeRO-3 one shard of the export at a time. The checkpoint
directory carries what the export needs besides weights in `model/`: config.json (after the vocabulary
resize), the tokenizer, and the training dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tokenizers import Tokenizer

from gptneox import GPTNeoXConfig
from gptneox.chat import save_generation_config
from gptneox.data import EOS_TOKEN, PAD_TOKEN, load_tokenizer, save_tokenizer
from gptneox.dtypes import dtype_name, torch_dtype
from gptneox.errors import MissingFileError, UserError
from gptneox.adapter import save_adapter
from gptneox.lora import LoraConfig, adapter_shapes, merged_weight
from gptneox.model import copy_rows, state_dict_shapes
from gptneox.training.checkpoint import CheckpointManager, is_tag_name, tag_for
from gptneox.training.output_dir import EXPORTED_ADAPTER, EXPORTED_WEIGHTS
from gptneox.training.safe_checkpoint import check_no_code
from gptneox.training.storage import DiskFullError, fsync_path, fsync_tree, out_of_space, remove_partial
from gptneox.weights import DEFAULT_SHARD_SIZE, CheckpointReader, save_weights, weights_fingerprint

MODEL_SUBDIR = "model"


def write_model_metadata(checkpoint_dir: str | Path, config: GPTNeoXConfig, tokenizer: Tokenizer,
                         dtype: str, lora: dict | None = None) -> None:
    """Called once by rank 0 at the start of training. A LoRA run's `lora` names the adapters' settings,
    the trained token ids and the base model (base_model as configured, base_directory on disk)."""
    directory = Path(checkpoint_dir) / MODEL_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory)
    save_tokenizer(tokenizer, directory, model_max_length=config.max_position_embeddings)
    (directory / "training.json").write_text(json.dumps({"dtype": dtype, "lora": lora}) + "\n")


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, tag: str | None = None,
                      dtype: str | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE,
                      trust_checkpoint_code: bool = False, base_model: str | Path | None = None,
                      allow_other_base: bool = False) -> Path:
    """Write the Hugging Face directory for `tag` (default: the newest complete checkpoint). Its .pt files
    are read weights-only first (gptneox.training.safe_checkpoint) unless `trust_checkpoint_code`. A LoRA
    checkpoint's adapters are merged into the base they were trained on (`base_model`: the directory it has
    moved to), whose weights must be those recorded, unless `allow_other_base`. A `tag` that is not a tag
    name (a path elsewhere) and an `output_dir` that is a file or in the checkpoint directory are refused
    before anything is read or written."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    metadata = checkpoint_dir / MODEL_SUBDIR
    if not (metadata / "config.json").is_file():
        hint = ""
        if (checkpoint_dir / "checkpoints" / MODEL_SUBDIR / "config.json").is_file():
            hint = f" (it is a run's output directory: pass {checkpoint_dir / 'checkpoints'})"
        elif is_tag_name(checkpoint_dir.name) and (checkpoint_dir.parent / MODEL_SUBDIR / "config.json").is_file():
            hint = f" (it is one checkpoint: pass {checkpoint_dir.parent} --tag {checkpoint_dir.name})"
        raise MissingFileError(f"{metadata / 'config.json'} not found: {checkpoint_dir} is not a checkpoint "
                               f"directory written by train.py{hint}")
    if tag is not None and not is_tag_name(tag):
        raise UserError(f"--tag {tag}: not a checkpoint tag name like {tag_for(40)} (one of the step* directories "
                        f"in {checkpoint_dir})")
    _check_output_dir(checkpoint_dir, output_dir)
    tag = tag or CheckpointManager(checkpoint_dir, keep=None, rank=0).latest_tag()
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise MissingFileError(f"{checkpoint_dir}: no complete checkpoint {tag or ''} to export")
    training = json.loads((metadata / "training.json").read_text())
    lora = training.get("lora")
    if lora is not None:
        base_dir = _lora_base(lora, base_model, allow_other_base)
        local = lora["base_model"] == lora["base_directory"]  # not a Hub id: the adapter names the directory
        lora = {**lora, "base_directory": base_dir, "base_model": base_dir if local else lora["base_model"]}
    elif base_model is not None:
        raise UserError(f"--base_model {base_model}: {checkpoint_dir} is from full fine-tuning, whose checkpoint "
                        "holds every weight; only a LoRA checkpoint is merged into a base")
    dtype = dtype_name(dtype or training["dtype"])
    check_no_code(checkpoint_dir / tag, trust=trust_checkpoint_code)  # DeepSpeed's reader unpickles freely
    # lazily: under ZeRO-3 each weight is gathered from the ranks' partitions only when its shard is written
    state = _quietly(get_fp32_state_dict_from_zero_checkpoint, str(checkpoint_dir), tag=tag, lazy_mode=True)
    config = GPTNeoXConfig.from_hf(metadata)
    expected = (state_dict_shapes(config) if lora is None else  # a LoRA checkpoint holds the adapters only
                adapter_shapes(config, _lora_config(lora), lora["token_ids"]))
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        reshaped = sorted(k for k in found.keys() & expected.keys() if found[k] != expected[k])
        raise RuntimeError(f"{checkpoint_dir / tag}: weights do not match {metadata / 'config.json'} (missing "
                           f"{sorted(expected.keys() - found.keys())}, unexpected "
                           f"{sorted(found.keys() - expected.keys())}, other shapes {reshaped})")
    # written aside, then moved in: a full disk leaves the directory as it was, not half a model
    staging = output_dir / ".export.partial"
    remove_partial(staging)
    tokenizer = load_tokenizer(metadata)
    try:
        if lora is None:
            save_chat_model(config, state, tokenizer, staging, max_shard_size, torch_dtype(dtype))
        else:
            adapters = {name: tensor.contiguous() for name, tensor in state.items()}
            save_chat_model(config, _merged(config, adapters, lora, training["dtype"]), tokenizer, staging,
                            max_shard_size, torch_dtype(dtype))
            save_adapter(staging / EXPORTED_ADAPTER, _lora_config(lora), adapters, lora["token_ids"],
                         base_model=lora["base_model"])
            save_tokenizer(tokenizer, staging / EXPORTED_ADAPTER, model_max_length=config.max_position_embeddings)
        fsync_tree(staging)
    except Exception as err:
        full = out_of_space(err, output_dir)
        remove_partial(staging)
        if full:
            raise DiskFullError(f"no space left on device while exporting {checkpoint_dir / tag} to {output_dir}; "
                                f"the checkpoint is intact: free some space, then run python tools/export_hf.py "
                                f"{checkpoint_dir} {output_dir}") from err
        raise
    for stale in [path for pattern in EXPORTED_WEIGHTS for path in output_dir.glob(pattern)]:
        stale.unlink()  # left over from an earlier export with a different shard count
    remove_partial(output_dir / EXPORTED_ADAPTER)  # a directory is not replaced by a rename
    for path in staging.iterdir():
        path.replace(output_dir / path.name)
    staging.rmdir()
    fsync_path(output_dir)
    return output_dir


def _check_output_dir(checkpoint_dir: Path, output_dir: Path) -> None:
    """The export moves files into `output_dir` and drops stale weights there: a file in its place cannot
    take them, and the checkpoint directory (its model/ metadata, its tags) must not get or lose any."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir}: the export's output directory is a file")
    if output_dir.resolve().is_relative_to(checkpoint_dir.resolve()):
        raise UserError(f"{output_dir}: the export's output directory is in the checkpoint directory "
                        f"{checkpoint_dir}; write it elsewhere (train.py exports into the run's output_dir)")


def _lora_config(lora: dict) -> LoraConfig:
    return LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                      target_modules=tuple(lora["target_modules"]))


def _lora_base(lora: dict, moved_to: str | Path | None, allow_other_base: bool) -> str:
    """The directory of the base the adapters are merged into: where training read it, or where it moved
    to; its weights must be the ones the adapters were trained against (checkpoints from before the
    fingerprint was recorded are taken as they are)."""
    recorded = lora["base_directory"]
    base_dir = Path(moved_to or recorded)
    if not base_dir.is_dir():
        raise MissingFileError(f"{base_dir}: the base model of this LoRA checkpoint ({lora['base_model']}) is not "
                               "there; the export merges the adapters into it (if it has moved, pass its "
                               "directory with --base_model)")
    expected, found = lora.get("base_weights"), weights_fingerprint(base_dir)
    if expected is not None and found != expected and not allow_other_base:
        raise UserError(f"{base_dir}: its weights (fingerprint {found}) are not those of the base this LoRA "
                        f"checkpoint was trained on ({expected}, read from {recorded}); pass --base_model with "
                        "that base, or --allow_other_base to merge the adapters into this one all the same")
    return str(base_dir)


def _merged(config: GPTNeoXConfig, adapters: dict, lora: dict, training_dtype: str) -> dict:
    """The merged model's weights: the base as training saw it (its directory's weights in the training
    dtype, the vocabulary grown as gptneox.model.copy_rows grows it), with the adapters folded in (fp32)."""
    base_dir = Path(lora["base_directory"])
    base_config = GPTNeoXConfig.from_hf(base_dir)
    reader = CheckpointReader(base_dir, state_dict_shapes(base_config), base_config.tie_word_embeddings)
    shapes = state_dict_shapes(config)
    scaling = _lora_config(lora).scaling
    merged = {}
    for name, tensor in reader.tensors(torch_dtype(training_dtype)):
        if tuple(tensor.shape) != shapes[name]:
            grown = tensor.new_empty(shapes[name])
            copy_rows(grown, tensor)
            tensor = grown
        merged[name] = merged_weight(name, tensor, adapters, scaling, lora["token_ids"])
    return merged


def _quietly(function, *args, **kwargs):
    """DeepSpeed's reader prints its progress (and a shard progress bar) into the training's own progress
    bar; what it printed is shown only if it fails, before its error."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            return function(*args, **kwargs)
    except BaseException:
        sys.stderr.write(printed.getvalue())
        raise


def save_chat_model(config: GPTNeoXConfig, tensors: dict, tokenizer: Tokenizer, output_dir: str | Path,
                    max_shard_size: str = DEFAULT_SHARD_SIZE, dtype: torch.dtype | None = None) -> Path:
    """A model directory that Hugging Face tools use as a chat model with no further settings: config.json
    with the tokenizer's eos and pad ids, the weights (gptneox.weights.save_weights: `tensors` may be lazy, cast
    to `dtype`), the tokenizer with the chat template, and generation_config.json with the chat's stop ids
    and sampling defaults."""
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    config = dataclasses.replace(config, bos_token_id=eos_id, eos_token_id=eos_id,
                                 pad_token_id=tokenizer.token_to_id(PAD_TOKEN))
    save_weights(config, tensors, output_dir, max_shard_size, dtype)
    save_tokenizer(tokenizer, output_dir, model_max_length=config.max_position_embeddings)  # the model's context
    save_generation_config(tokenizer, output_dir)
    return Path(output_dir)
