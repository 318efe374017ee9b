"""load_tokenizer / save_tokenizer: chat tokens in a fixed order, identical in every process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from gptneox.data import CHAT_TOKENS, SPECIAL_TOKENS, load_tokenizer, save_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TOKENIZER = ROOT / "data" / "sample" / "tokenizer.json"


def test_sample_tokenizer_has_neox_specials_and_appended_chat_tokens():
    raw = Tokenizer.from_file(str(SAMPLE_TOKENIZER))
    base_size = raw.get_vocab_size()
    tok = load_tokenizer(SAMPLE_TOKENIZER)
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|padding|>") == 1
    assert [tok.token_to_id(t) for t in CHAT_TOKENS] == list(range(base_size, base_size + 5))
    assert tok.get_vocab_size() == base_size + 5


def test_directory_and_file_give_the_same_tokenizer():
    by_dir = load_tokenizer(SAMPLE_TOKENIZER.parent)
    by_file = load_tokenizer(SAMPLE_TOKENIZER)
    assert by_dir.to_str() == by_file.to_str()


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(bad)


def test_eos_and_pad_are_added_when_absent(tmp_path):
    bare = Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.add_tokens(["a", "b"])
    bare.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(2, 9))


def test_special_tokens_are_atomic():
    tok = load_tokenizer(SAMPLE_TOKENIZER)
    text = "<|system|>x<|endoftext|><|prompter|>hi<|endoftext|><|assistant|>"
    ids = tok.encode(text).ids
    for token in ("<|system|>", "<|endoftext|>", "<|prompter|>", "<|assistant|>"):
        assert tok.token_to_id(token) in ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_loading_twice_adds_nothing(tmp_path):
    tok = load_tokenizer(SAMPLE_TOKENIZER)
    save_tokenizer(tok, tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.get_vocab_size() == tok.get_vocab_size()
    assert [again.token_to_id(t) for t in SPECIAL_TOKENS] == [tok.token_to_id(t) for t in SPECIAL_TOKENS]


def test_saved_directory_loads_in_transformers_with_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only oracle")
    tok = load_tokenizer(SAMPLE_TOKENIZER)
    save_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|padding|>"
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == 0 and hf.pad_token_id == 1
    assert len(hf) == tok.get_vocab_size()
    text = "<|prompter|>What is a meme?<|endoftext|><|assistant|>"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert hf.convert_tokens_to_ids(list(CHAT_TOKENS)) == [tok.token_to_id(t) for t in CHAT_TOKENS]
    assert set(CHAT_TOKENS) <= set(hf.all_special_tokens)


@pytest.mark.slow
def test_chat_token_ids_do_not_depend_on_the_hash_seed():
    """The reference's set-ordered tokens changed with PYTHONHASHSEED; ours must not."""
    script = (
        "from gptneox.data import load_tokenizer, SPECIAL_TOKENS;"
        f"t = load_tokenizer({str(SAMPLE_TOKENIZER)!r});"
        "print([t.token_to_id(s) for s in SPECIAL_TOKENS]);"
        "print(hash('<|prompter|>'))"
    )
    outputs = []
    for seed in ("0", "12345"):  # 0 turns hash randomisation off
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                cwd=ROOT, check=True)
        ids_line, hash_line = result.stdout.strip().splitlines()
        outputs.append((ids_line, hash_line))
    assert len({ids for ids, _ in outputs}) == 1
    assert len({h for _, h in outputs}) > 1  # the seeds really changed string hashing
