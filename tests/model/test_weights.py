"""Checkpoint reading and writing, vocabulary resize, the conversion tools and the golden logits."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptneox import GPTNeoX
from gptneox import weights
from gptneox.cli.convert_checkpoint import main as convert_main
from gptneox.data import load_tokenizer, save_tokenizer
from gptneox.weights import CheckpointError, parse_size

from tests.helpers import REPO, run_main, run_python

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SAMPLE_TOKENIZER = REPO / "data" / "sample" / "tokenizer.json"


def same_parameters(a: GPTNeoX, b: GPTNeoX) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_golden_logits_from_fixture():
    """Logits written by transformers (tools/reference_logits.py) for a checkpoint transformers saved."""
    golden = load_file(FIXTURES / "tiny-gptneox-logits.safetensors")
    model = GPTNeoX.from_pretrained(FIXTURES / "tiny-gptneox").eval()
    prompts = sorted(k for k in golden if k.startswith("input_ids."))
    assert len(prompts) == 2
    for backend in ("sdpa", "eager"):
        model.attention_backend = backend
        for key in prompts:
            with torch.no_grad():
                ours = model(golden[key])
            expected = golden[key.replace("input_ids", "logits")]
            assert ours.shape == expected.shape
            assert (ours - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("num_shards", [1, 3])
@pytest.mark.parametrize("tied", [False, True])
def test_load_every_layout(tiny_checkpoint, fmt, num_shards, tied):
    directory, model = tiny_checkpoint(fmt=fmt, num_shards=num_shards, tie_word_embeddings=tied)
    loaded = GPTNeoX.from_pretrained(directory)
    assert same_parameters(loaded, model)
    assert (loaded.embed_out.weight is loaded.gpt_neox.embed_in.weight) == tied
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_save_round_trip_bit_exact(tmp_path, tiny_model):
    model = tiny_model().half()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 1 and all((tmp_path / "many" / f).is_file() for f in shard_files)
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in model.parameters())
    for name in ("one", "many"):
        assert same_parameters(GPTNeoX.from_pretrained(tmp_path / name, dtype="auto"), model)
    # saving again with one shard removes the stale shards and index
    model.save_pretrained(tmp_path / "many")
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["config.json", "model.safetensors"]


def test_lazy_tensors_are_made_one_shard_at_a_time_and_cast(tmp_path, tiny_model):
    """save_weights with stand-ins (DeepSpeed's lazily gathered ZeRO-3 tensors): a tensor is made only after
    every earlier shard is on disk, and the files hold the tensors cast to the requested dtype."""
    model = tiny_model()
    state = model.state_dict()
    made = []

    class Lazy:
        def __init__(self, name, tensor):
            self.name, self.tensor, self.shape, self.dtype = name, tensor, tensor.shape, tensor.dtype

        def contiguous(self):
            made.append((self.name, sorted(p.name for p in tmp_path.glob("out/model-*.safetensors"))))
            return self.tensor.clone()

    weights.save_weights(model.config, {k: Lazy(k, v) for k, v in state.items()}, tmp_path / "out",
                         max_shard_size=10_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 2 and [name for name, _ in made] == list(state)
    for name, written in made:
        assert written == files[:files.index(index[name])], name  # the earlier shards, and only those
    loaded = {k: v for f in files for k, v in load_file(tmp_path / "out" / f).items()}
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], v.to(torch.bfloat16))
               for k, v in state.items())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_weight_files_get_the_mode_of_every_other_file(tmp_path, tiny_model, umask):
    previous = os.umask(umask)
    try:
        tiny_model().save_pretrained(tmp_path, max_shard_size="20KB")
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert len(modes) > 3 and set(modes.values()) == {0o666 & ~umask}, modes


def test_tied_save_writes_no_head(tmp_path, tiny_model):
    tiny_model(tie_word_embeddings=True).save_pretrained(tmp_path)
    assert "embed_out.weight" not in load_file(tmp_path / "model.safetensors")


def test_dtype_cast_and_legacy_buffers(tiny_checkpoint, tmp_path, checkpoint_writer):
    directory, model = tiny_checkpoint()
    state = {k: v for k, v in load_file(directory / "model.safetensors").items()}
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = torch.ones(2).half()
    state["lm_head.weight"] = state.pop("embed_out.weight")  # transformers 5 naming
    legacy = checkpoint_writer(tmp_path / "legacy", model.config.to_hf(), state, fmt="bin")
    loaded = GPTNeoX.from_pretrained(legacy, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.embed_out.weight, model.embed_out.weight.bfloat16())
    assert GPTNeoX.from_pretrained(legacy, dtype="float16").embed_out.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        GPTNeoX.from_pretrained(legacy, dtype="int8")


def test_mismatches_reported_together(tiny_checkpoint, tmp_path, checkpoint_writer):
    directory, model = tiny_checkpoint()
    state = load_file(directory / "model.safetensors")
    del state["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    state["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(48, 40)
    state["gpt_neox.layers.0.attention.rotary.extra"] = torch.zeros(3)
    bad = checkpoint_writer(tmp_path / "bad", model.config.to_hf(), state, num_shards=2)
    with pytest.raises(CheckpointError) as err:
        GPTNeoX.from_pretrained(bad)
    message = str(err.value)
    assert "missing key 'gpt_neox.layers.1.mlp.dense_4h_to_h.bias' [48]" in message
    assert ("shape mismatch for 'gpt_neox.layers.0.attention.dense.weight': checkpoint [48, 40]" in message
            and "model [48, 48]" in message)
    assert "unexpected key 'gpt_neox.layers.0.attention.rotary.extra' [3]" in message


def test_key_stored_twice_names_both_files(tiny_checkpoint, tmp_path, checkpoint_writer):
    directory, model = tiny_checkpoint()
    state = load_file(directory / "model.safetensors")
    state["lm_head.weight"] = state["embed_out.weight"].clone()  # the transformers 5 alias as well
    with pytest.raises(CheckpointError, match="'lm_head.weight' in model.safetensors duplicates "
                                              "'embed_out.weight' in model.safetensors"):
        GPTNeoX.from_pretrained(checkpoint_writer(tmp_path / "alias", model.config.to_hf(), state))

    directory, _ = tiny_checkpoint(num_shards=2)
    first, second = (directory / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    key = next(iter(load_file(first)))
    save_file({**load_file(second), key: load_file(first)[key]}, str(second))
    with pytest.raises(CheckpointError, match=f"'{key}' in {second.name} duplicates '{key}' in {first.name}"):
        GPTNeoX.from_pretrained(directory)


def test_unsupported_safetensors_dtype_is_named(tiny_checkpoint, tmp_path, checkpoint_writer):
    directory, model = tiny_checkpoint()
    state = load_file(directory / "model.safetensors")
    state["gpt_neox.final_layer_norm.bias"] = torch.zeros(48, dtype=torch.uint16)
    state["gpt_neox.final_layer_norm.weight"] = torch.zeros(48, dtype=torch.float8_e4m3fn)
    bad = checkpoint_writer(tmp_path / "bad", model.config.to_hf(), state)
    with pytest.raises(CheckpointError) as err:
        GPTNeoX.from_pretrained(bad)
    assert "unsupported dtype U16 for 'gpt_neox.final_layer_norm.bias' in model.safetensors" in str(err.value)
    assert "unsupported dtype F8_E4M3 for 'gpt_neox.final_layer_norm.weight'" in str(err.value)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_an_integer_weight_is_refused_not_cast(tiny_checkpoint, tmp_path, checkpoint_writer, fmt):
    """int32 of the right shape was cast to float without a word (its values truncated to whole numbers)."""
    directory, model = tiny_checkpoint()
    state = load_file(directory / "model.safetensors")
    state["gpt_neox.layers.0.attention.dense.weight"] = state["gpt_neox.layers.0.attention.dense.weight"].int()
    bad = checkpoint_writer(tmp_path / "bad", model.config.to_hf(), state, fmt=fmt)
    with pytest.raises(CheckpointError, match=r"'gpt_neox.layers.0.attention.dense.weight' in \S+ is int32, not "
                                              r"a floating-point weight \(quantized checkpoints are not read\)"):
        GPTNeoX.from_pretrained(bad)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_auto_dtype_comes_from_the_header(tiny_checkpoint, monkeypatch, fmt):
    """dtype="auto" must not read the embedding an extra time just to learn its dtype."""
    directory, model = tiny_checkpoint(fmt=fmt)
    read, tensors = [], weights._ShardReader.tensors

    def counting(self, keys):
        read.extend(keys)
        return tensors(self, keys)

    monkeypatch.setattr(weights._ShardReader, "tensors", counting)
    assert same_parameters(GPTNeoX.from_pretrained(directory, dtype="auto"), model)
    assert sorted(read) == sorted(model.state_dict())


def test_broken_files_are_named(tiny_checkpoint, tmp_path):
    directory, _ = tiny_checkpoint(num_shards=2)
    shard = directory / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated download
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: cannot read checkpoint file"):
        GPTNeoX.from_pretrained(directory)
    shard.unlink()
    with pytest.raises(CheckpointError, match="index.json names shard files that do not exist: "
                                              "\\['model-00002-of-00002.safetensors'\\]"):
        GPTNeoX.from_pretrained(directory)

    bin_dir, _ = tiny_checkpoint(fmt="bin")
    (bin_dir / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read checkpoint file"):
        GPTNeoX.from_pretrained(bin_dir)
    (bin_dir / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint found \\(looked for model.safetensors.index.json"):
        GPTNeoX.from_pretrained(bin_dir)
    (bin_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        GPTNeoX.from_pretrained(bin_dir)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size='2 parsecs'"):
        parse_size("2 parsecs")


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings(tiny_model, tied):
    model = tiny_model(tie_word_embeddings=tied)
    old_in, old_out = model.gpt_neox.embed_in.weight.clone(), model.embed_out.weight.clone()
    assert model.resize_token_embeddings(101, pad_to_multiple_of=16) == 112
    assert model.config.vocab_size == 112 and model.gpt_neox.embed_in.weight.shape == (112, 48)
    assert torch.equal(model.gpt_neox.embed_in.weight[:96], old_in)
    assert torch.allclose(model.gpt_neox.embed_in.weight[96:], old_in.mean(0).expand(16, 48))
    assert torch.allclose(model.embed_out.weight[96:], old_out.mean(0).expand(16, 48))
    assert (model.embed_out.weight is model.gpt_neox.embed_in.weight) == tied
    assert model(torch.tensor([[111, 3]])).shape == (1, 2, 112)
    assert model.resize_token_embeddings(90) == 90  # shrinking keeps the first rows, as OA's 50432 -> 50288
    assert torch.equal(model.embed_out.weight, old_out[:90])
    with pytest.raises(ValueError, match="resize_token_embeddings\\(0"):
        model.resize_token_embeddings(0)


@pytest.mark.slow
def test_convert_checkpoint_tool_bit_exact(tiny_checkpoint, tmp_path):
    source, model = tiny_checkpoint(fmt="bin", num_shards=2)
    save_tokenizer(load_tokenizer(SAMPLE_TOKENIZER), source)
    (source / "generation_config.json").write_text('{"max_new_tokens": 7}')
    result = run_python("tools/convert_checkpoint.py", str(source), str(tmp_path / "out"), "--max_shard_size", "30KB")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (source / name).read_bytes(), name
    assert "copied tokenizer.json, tokenizer_config.json" in result.stdout
    assert same_parameters(GPTNeoX.from_pretrained(tmp_path / "out", dtype="auto"), model)
    result = run_main(convert_main, "convert_checkpoint.py", tmp_path / "out", tmp_path / "half", "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    assert GPTNeoX.from_pretrained(tmp_path / "half", dtype="auto").embed_out.weight.dtype == torch.float16
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[0]
    shard.write_bytes(b"not safetensors")
    broken = run_main(convert_main, "convert_checkpoint.py", tmp_path / "out", tmp_path / "again")
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "convert_checkpoint.py: error:" in broken.stderr and shard.name in broken.stderr


@pytest.mark.slow
def test_reference_logits_tool_with_our_engine(tmp_path):
    out = tmp_path / "logits.safetensors"
    result = run_python("tools/reference_logits.py", "--model", str(FIXTURES / "tiny-gptneox"), "--prompts",
                      "1 5 9 33 2 17 80 95 4 4 61 0", "--output", str(out), "--engine", "gptneox")
    assert result.returncode == 0, result.stderr
    ours, golden = load_file(out), load_file(FIXTURES / "tiny-gptneox-logits.safetensors")
    assert torch.equal(ours["input_ids.0"], golden["input_ids.0"])
    assert (ours["logits.0"] - golden["logits.0"]).abs().max() <= 1e-4


def test_legacy_bin_loads_weights_only(tiny_checkpoint, tmp_path):
    """torch.save(_use_new_zipfile_serialization=False): what torch < 1.6 wrote; it cannot be memory-mapped."""
    directory, model = tiny_checkpoint(fmt="bin")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    torch.save(state, directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert not (directory / "pytorch_model.bin").read_bytes().startswith(b"PK")
    assert same_parameters(GPTNeoX.from_pretrained(directory), model)


def test_bin_with_non_tensor_entries_is_refused_naming_them(tiny_checkpoint):
    directory, _ = tiny_checkpoint(fmt="bin")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "global_step": 1200, "args": {"lr": 1e-5}}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: entries that are not tensors: "
                                              "'global_step' \\(int\\), 'args' \\(dict\\)"):
        GPTNeoX.from_pretrained(directory)
    torch.save([state], directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: expected a dict of tensors, got list"):
        GPTNeoX.from_pretrained(directory)
