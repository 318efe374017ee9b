"""Models from the Hugging Face cache, offline: a cache laid out exactly as huggingface_hub writes it
(blobs named by hash, relative symlinks from snapshots/<commit>/ into blobs/, refs/main holding the commit),
checked against huggingface_hub's own cache scanner."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

from gptneox import GPTNeoX
from gptneox.chat import load_model_and_tokenizer
from gptneox.errors import UserError
from gptneox.hub import cache_dirs, find_snapshot
from gptneox.training.config import TrainConfigError
from gptneox.training.model_setup import find_model_dir

from tests.helpers import REPO

REPO_ID = "stabilityai/stablelm-base-alpha-7b"
SAMPLE_TOKENIZER = REPO / "data" / "sample" / "tokenizer.json"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """No real cache of this machine is seen: HOME and every cache variable point into tmp_path."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def add_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path], *, main: bool = True,
                 incomplete: tuple[str, ...] = ()) -> Path:
    """Store `files` (name -> source file) the way huggingface_hub does; names in `incomplete` are left as
    a `.incomplete` blob with no symlink, as an interrupted download leaves them."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if name in incomplete:
            blob.with_name(blob.name + ".incomplete").write_bytes(data[: len(data) // 2])
            continue
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def model_files(tmp_path, tiny_model):
    """A tiny model saved in two shards with the sample tokenizer: name -> file."""
    source = tmp_path / "source"
    model = tiny_model(vocab_size=1552)
    model.save_pretrained(source, max_shard_size=200_000)
    (source / "tokenizer.json").write_bytes(SAMPLE_TOKENIZER.read_bytes())
    files = {p.name: p for p in sorted(source.iterdir())}
    assert "model.safetensors.index.json" in files
    return files, model


def test_the_fixture_is_a_cache_huggingface_hub_reads(tmp_path, model_files):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    files, _ = model_files
    cache = tmp_path / "hub"
    snapshot = add_snapshot(cache, REPO_ID, "a" * 40, files)
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and repo.refs == {"main": next(iter(repo.revisions))}
    assert Path(try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache)) == snapshot / "config.json"


def test_a_hub_id_loads_from_the_refs_main_snapshot_through_the_blob_symlinks(tmp_path, monkeypatch, model_files):
    files, model = model_files
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = add_snapshot(cache, REPO_ID, "b" * 40, files)
    assert (snapshot / "config.json").is_symlink()
    assert find_model_dir(REPO_ID, cache_dir=str(tmp_path / "data")) == snapshot
    loaded = GPTNeoX.from_pretrained(snapshot, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200]])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    chat_model, tokenizer = load_model_and_tokenizer(REPO_ID)  # the chat tools resolve it the same way
    assert tokenizer.get_vocab_size() == 1541 and chat_model.config == loaded.config


def test_an_interrupted_download_is_passed_over_for_the_newest_complete_snapshot(tmp_path, monkeypatch, model_files):
    files, _ = model_files
    home_cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    shard = next(name for name in files if name.startswith("model-00002"))
    older = add_snapshot(home_cache, REPO_ID, "1" * 40, files, main=False)
    newer = add_snapshot(home_cache, REPO_ID, "2" * 40, files, main=False)
    os.utime(older, (time.time() - 3600,) * 2)
    partial = add_snapshot(home_cache, REPO_ID, "3" * 40, files, incomplete=(shard,))  # refs/main points here
    assert not (partial / shard).exists() and (partial / "config.json").is_file()
    assert find_model_dir(REPO_ID, cache_dir=".") == newer


def test_a_local_directory_of_that_name_wins_over_the_cache(tmp_path, monkeypatch, model_files):
    files, _ = model_files
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    add_snapshot(tmp_path / "hub", REPO_ID, "c" * 40, files)
    local = tmp_path / "data" / REPO_ID
    local.mkdir(parents=True)
    (local / "config.json").write_bytes(files["config.json"].read_bytes())
    assert find_model_dir(REPO_ID, cache_dir=str(tmp_path / "data")) == local


def test_the_error_names_every_place_looked(tmp_path, monkeypatch, model_files):
    files, _ = model_files
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    shard = next(name for name in files if name.startswith("model-00001"))
    partial = add_snapshot(tmp_path / "hf-home" / "hub", REPO_ID, "d" * 40, files, incomplete=(shard,))
    assert cache_dirs() == [tmp_path / "hub", tmp_path / "hf-home" / "hub", tmp_path / "home" / ".cache" /
                            "huggingface" / "hub"]
    assert find_snapshot(REPO_ID)[0] is None
    with pytest.raises(TrainConfigError) as raised:
        find_model_dir(REPO_ID, cache_dir="data")
    message = str(raised.value)
    for place in (tmp_path / REPO_ID / "config.json", tmp_path / "data" / REPO_ID / "config.json",
                  tmp_path / "hub" / "models--stabilityai--stablelm-base-alpha-7b",
                  tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--stabilityai--stablelm-base-alpha-7b"):
        assert str(place) in message
    assert f"{partial} (" in message and shard in message  # the incomplete snapshot and what it lacks
    assert "\n" not in message
    with pytest.raises(UserError, match="models--stabilityai--stablelm-base-alpha-7b"):
        load_model_and_tokenizer(REPO_ID)


def test_paths_are_not_hub_ids(tmp_path):
    with pytest.raises(TrainConfigError) as raised:
        find_model_dir("./org/name", cache_dir="data")
    assert "Hugging Face cache" not in str(raised.value)
