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
from gptneox.errors import MissingFileError
from gptneox.model import state_dict_shapes
from gptneox.training.checkpoint import CheckpointManager
from gptneox.training.output_dir import EXPORTED_WEIGHTS
from gptneox.training.storage import DiskFullError, fsync_path, fsync_tree, out_of_space, remove_partial
from gptneox.weights import DEFAULT_SHARD_SIZE, save_weights

MODEL_SUBDIR = "model"


def write_model_metadata(checkpoint_dir: str | Path, config: GPTNeoXConfig, tokenizer: Tokenizer,
                         dtype: str) -> None:
    """Called once by rank 0 at the start of training."""
    directory = Path(checkpoint_dir) / MODEL_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory)
    save_tokenizer(tokenizer, directory, model_max_length=config.max_position_embeddings)
    (directory / "training.json").write_text(json.dumps({"dtype": dtype}) + "\n")


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, tag: str | None = None,
                      dtype: str | None = None, max_shard_size: str = DEFAULT_SHARD_SIZE) -> Path:
    """Write the Hugging Face directory for `tag` (default: the newest complete checkpoint)."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    metadata = checkpoint_dir / MODEL_SUBDIR
    if not (metadata / "config.json").is_file():
        raise MissingFileError(f"{metadata / 'config.json'} not found: {checkpoint_dir} is not a checkpoint "
                                "directory written by train.py")
    tag = tag or CheckpointManager(checkpoint_dir, keep=None, rank=0).latest_tag()
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise MissingFileError(f"{checkpoint_dir}: no complete checkpoint {tag or ''} to export")
    dtype = dtype_name(dtype or json.loads((metadata / "training.json").read_text())["dtype"])
    # lazily: under ZeRO-3 each weight is gathered from the ranks' partitions only when its shard is written
    state = _quietly(get_fp32_state_dict_from_zero_checkpoint, str(checkpoint_dir), tag=tag, lazy_mode=True)
    config = GPTNeoXConfig.from_hf(metadata)
    expected = state_dict_shapes(config)
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        reshaped = sorted(k for k in found.keys() & expected.keys() if found[k] != expected[k])
        raise RuntimeError(f"{checkpoint_dir / tag}: weights do not match {metadata / 'config.json'} (missing "
                           f"{sorted(expected.keys() - found.keys())}, unexpected "
                           f"{sorted(found.keys() - expected.keys())}, other shapes {reshaped})")
    # written aside, then moved in: a full disk leaves the directory as it was, not half a model
    staging = output_dir / ".export.partial"
    remove_partial(staging)
    try:
        save_chat_model(config, state, load_tokenizer(metadata), staging, max_shard_size, torch_dtype(dtype))
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
    for path in staging.iterdir():
        path.replace(output_dir / path.name)
    staging.rmdir()
    fsync_path(output_dir)
    return output_dir


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
