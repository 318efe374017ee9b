"""Read and write Hugging Face GPT-NeoX checkpoints (safetensors or torch .bin, single file or sharded).

Loading fills a model built on the meta device (by GPTNeoX.from_pretrained) one tensor at a time, so host
memory peaks near one copy of the weights in the target dtype (plus one tensor in flight), whatever the
checkpoint's size. This module knows the model only through its config, state_dict and tie_weights, so
the import goes one way: gptneox.model uses gptneox.weights.
Before any data is read, every name and shape is checked against the model, every dtype is checked to
be readable and no key may be stored twice; all problems are reported together.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .dtypes import torch_dtype
from .errors import MissingFileError, UserError

# Searched in this order; the first one present wins.
CHECKPOINT_FILES = ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin")
# Buffers older transformers saved; they are recomputed, never loaded.
_LEGACY_BUFFER = re.compile(r"\.attention\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")
# The largest safetensors file written unless asked otherwise (the size transformers uses).
DEFAULT_SHARD_SIZE = "2GB"
# transformers 5 names the head lm_head and may save it under that name.
_ALIASES = {"lm_head.weight": "embed_out.weight"}


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model, or a save option that cannot be honoured; the message names
    the files, keys and shapes (or the option and its value)."""


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, following a shard index if there is one."""
    directory = Path(directory)
    for name in CHECKPOINT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a shard index with a 'weight_map' ({err!r})") from None
        shards = [directory / f for f in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{path} names shard files that do not exist: {missing}")
        return shards
    raise MissingFileError(f"{directory}: no checkpoint found (looked for {', '.join(CHECKPOINT_FILES)})")


def weights_fingerprint(directory: str | Path) -> str:
    """sha256 of each weight file's name and size and of its first, middle and last MiB: 3 MiB a file at any
    model size, and enough to tell one model from another of the same shape (another seed, another
    fine-tune), whose bytes differ throughout. It tells bases apart; it does not prove two files equal."""
    sample = 1 << 20
    digest = hashlib.sha256()
    for path in checkpoint_files(directory):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as file:
            for offset in sorted({0, max(0, size // 2 - sample // 2), max(0, size - sample)}):
                file.seek(offset)
                digest.update(file.read(sample))
    return digest.hexdigest()[:16]


class _ShardReader:
    """One safetensors or .bin file: its names and shapes first, then its tensors one at a time.

    The file is opened afresh for each pass and closed after it, so pages of an already-loaded shard do
    not stay mapped while the next one is read.
    """

    def __init__(self, path: Path):
        self.path = path
        self.is_safetensors = path.suffix == ".safetensors"
        with self._open() as tensors:
            if self.is_safetensors:
                slices = {k: tensors.get_slice(k) for k in tensors.keys()}
                self.shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
                # from the header, so dtype="auto" reads no data; an unsupported one stays its name (a str)
                self.dtypes = {k: _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()) for k, s in slices.items()}
            else:
                self.shapes = {k: tuple(t.shape) for k, t in tensors.items()}
                self.dtypes = {k: t.dtype for k, t in tensors.items()}

    def _open(self):
        try:
            if self.is_safetensors:
                return safe_open(str(self.path), framework="pt")
            # mmap (a tensor is only read from disk when it is copied out) needs the zip format of
            # torch >= 1.6; an older, legacy-format file is read whole, still weights-only
            tensors = torch.load(self.path, map_location="cpu", weights_only=True,
                                 mmap=zipfile.is_zipfile(self.path))
        except Exception as err:  # truncated, corrupt, unsafe pickle or not a checkpoint at all
            raise CheckpointError(f"{self.path}: cannot read checkpoint file ({type(err).__name__}: {err})") from None
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, got {type(tensors).__name__}")
        # an optimizer state or a step counter saved next to the weights: this is not a weights file
        others = {k: type(v).__name__ for k, v in tensors.items() if not isinstance(v, torch.Tensor)}
        if others:
            raise CheckpointError(f"{self.path}: entries that are not tensors: "
                                  + ", ".join(f"{k!r} ({kind})" for k, kind in others.items()))
        return contextlib.nullcontext(tensors)

    def tensors(self, keys: list[str]):
        """Yield (key, tensor) for each key. Safetensors data is read with plain reads into fresh tensors
        (a memory map would keep the whole file resident); .bin tensors are views of the mapped file."""
        if not self.is_safetensors:
            with self._open() as tensors:
                for key in keys:
                    yield key, tensors[key]
            return
        with open(self.path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
            for key in keys:
                entry = header[key]
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=self.dtypes[key])
                file.seek(8 + header_size + begin)
                if file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is truncated")
                yield key, tensor


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _model_name(name: str) -> str | None:
    """The model parameter a checkpoint key fills, or None for buffers that are dropped."""
    if _LEGACY_BUFFER.search(name):
        return None
    return _ALIASES.get(name, name)


_LAYER_KEY = re.compile(r"^(?:gpt_neox\.)?layers\.(\d+)\.")


def check_config_fits_weights(config, directory: str | Path) -> None:
    """Before a model of `config` (the directory's config.json) is built: its layer count and widths must be
    those of the weight files' headers, so a config.json asking for far more than its weights (hidden_size
    2**30, 10**7 layers) is refused in one line naming the key and both values instead of building toward
    it. Only what the headers show is compared; CheckpointReader checks every name and shape later."""
    directory = Path(directory)
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for reader in (_ShardReader(f) for f in checkpoint_files(directory)):
        shapes.update({key: (shape, reader.path.name) for key, shape in reader.shapes.items()})
    layers = {int(match.group(1)) for key in shapes if (match := _LAYER_KEY.match(key))}
    where = directory / "config.json"
    files = ", ".join(sorted({name for _, name in shapes.values()}))
    if len(layers) != config.num_hidden_layers:
        raise CheckpointError(f"{where}: num_hidden_layers={config.num_hidden_layers}, but the weights ({files}) "
                              f"hold {len(layers)} layers")
    widths = [("gpt_neox.embed_in.weight", ("vocab_size", "hidden_size")),
              ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", ("intermediate_size", "hidden_size"))]
    for key, names in widths:
        if key not in shapes:
            continue
        shape, file = shapes[key]
        for name, size in zip(names, shape):
            if getattr(config, name) != size:
                raise CheckpointError(f"{where}: {name}={getattr(config, name)}, but {key} in {file} is "
                                      f"{list(shape)} ({name} {size})")


class CheckpointReader:
    """The weights of a Hugging Face directory, checked against the parameter shapes a model expects (all
    problems reported together, before any data is read), then read one tensor at a time.

    `expected` maps parameter names to shapes; with `tie_word_embeddings` the head is embed_in's and a
    stored copy is ignored, as transformers does. `names` is the order in which `tensors` yields them.
    """

    def __init__(self, path: str | Path, expected: dict[str, tuple[int, ...]], tie_word_embeddings: bool):
        self.path = Path(path)
        readers = [_ShardReader(f) for f in checkpoint_files(self.path)]
        expected = dict(expected)
        if tie_word_embeddings:
            expected.pop("embed_out.weight", None)
        sources, problems = {}, []
        for reader in readers:
            for key, shape in reader.shapes.items():
                name = _model_name(key)
                if name is None or (name == "embed_out.weight" and tie_word_embeddings):
                    continue
                if isinstance(reader.dtypes[key], str):
                    problems.append(f"unsupported dtype {reader.dtypes[key]} for {key!r} in {reader.path.name}")
                elif not reader.dtypes[key].is_floating_point:  # cast, its values would be silently wrong
                    stored = str(reader.dtypes[key]).removeprefix("torch.")
                    problems.append(f"{key!r} in {reader.path.name} is {stored}, not a floating-point weight "
                                    "(quantized checkpoints are not read)")
                if name in sources:
                    first, first_key = sources[name]
                    problems.append(f"{key!r} in {reader.path.name} duplicates {first_key!r} in {first.path.name}")
                elif name not in expected:
                    problems.append(f"unexpected key {key!r} {list(shape)} in {reader.path.name}")
                elif shape != expected[name]:
                    problems.append(f"shape mismatch for {key!r}: checkpoint {list(shape)} in {reader.path.name}, "
                                    f"model {list(expected[name])}")
                sources.setdefault(name, (reader, key))
        problems += [f"missing key {name!r} {list(shape)}" for name, shape in expected.items() if name not in sources]
        if problems:
            raise CheckpointError(f"{self.path}: checkpoint does not match config.json:\n  " + "\n  ".join(problems))
        # grouped by file, so that each file is opened once
        self._sources = {name: sources[name] for reader in readers for name in sources if sources[name][0] is reader}
        self.names = list(self._sources)

    def dtype(self, dtype: torch.dtype | str | None) -> torch.dtype:
        """None = float32, "auto" = the stored dtype, or a name of gptneox.dtypes."""
        if dtype is None:
            return torch.float32
        if dtype == "auto":
            reader, key = self._sources["gpt_neox.embed_in.weight"]
            return reader.dtypes[key]
        return torch_dtype(dtype) if isinstance(dtype, str) else dtype

    def tensors(self, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None):
        """Yield (parameter name, tensor in `dtype` on `device`) in the order of `names`; each tensor owns its
        memory (a .bin tensor, a view of the mapped file, is copied)."""
        dtype = self.dtype(dtype)
        for reader, group in itertools.groupby(self._sources.items(), key=lambda item: item[1][0]):
            names = {key: name for name, (_, key) in group}
            for key, tensor in reader.tensors(list(names)):
                yield names[key], tensor.to(device=device, dtype=dtype, copy=not reader.is_safetensors)


def load_weights(model: nn.Module, path: str | Path, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None) -> None:
    """Fill `model` (a GPTNeoX, usually on the meta device) from the weights of a Hugging Face directory.
    dtype None = float32, "auto" = the stored dtype, or a name of gptneox.dtypes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    reader = CheckpointReader(path, expected, model.config.tie_word_embeddings)
    for name, tensor in reader.tensors(dtype, device):
        module_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor))
    model.tie_weights()


def parse_size(size: int | str) -> int:
    """Bytes in "2GB" (10^9), "500MiB" (2^20) or a plain integer."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise CheckpointError(f"max_shard_size={size!r}: expected bytes or a size like '2GB' or '500MiB'")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(number * scale)


def _give_default_mode(path: Path) -> None:
    """safetensors writes through a private temporary file and keeps its mode (-rw-------); a weight file
    should be readable like the config.json beside it (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(model: nn.Module, directory: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> None:
    """config.json plus model.safetensors, or numbered shards and model.safetensors.index.json.
    Shards are copied to the CPU one at a time, so saving from a GPU needs host memory for one shard only."""
    save_weights(model.config, model.state_dict(), directory, max_shard_size)


def save_weights(config, tensors: dict, directory: str | Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                 dtype: torch.dtype | None = None) -> None:
    """save_pretrained for a config and its tensors by name (a tied head is not written: transformers
    re-ties it from embed_in). A value may also be a stand-in with `shape`, `dtype` and `contiguous()`, such
    as DeepSpeed's lazily gathered ZeRO-3 tensors: each is made, cast to `dtype` (None: kept) and copied to
    the CPU only while its shard is written, so the host holds one shard, not the model."""
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in tensors.items() if not (k == "embed_out.weight" and config.tie_word_embeddings)}

    def size(tensor) -> int:
        return math.prod(tensor.shape) * (dtype or tensor.dtype).itemsize

    shards, current, current_size = [], {}, 0
    for name, tensor in tensors.items():
        if current and current_size + size(tensor) > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += size(tensor)
    shards.append(current)

    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        stale.unlink()  # left over from an earlier save with a different shard count
    config.save(directory)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file_name, shard in zip(names, shards):
        made = {k: v.contiguous().detach().to(device="cpu", dtype=dtype or v.dtype) for k, v in shard.items()}
        save_file(made, str(directory / file_name), metadata={"format": "pt"})
        _give_default_mode(directory / file_name)
        del made  # before the next shard is made
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(size(t) for t in tensors.values())},
                 "weight_map": {k: f for f, shard in zip(names, shards) for k in shard}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
