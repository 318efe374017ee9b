"""The resume checks on their own: every setting compared, both values named, waivable ones waived."""
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from gptneox import GPTNeoXConfig
from gptneox.data import load_tokenizer
from gptneox.training.resume_check import (FIXED, WAIVABLE, ResumeMismatch, check_resume, dataset_fingerprint,
                                           read_run_record, run_record, tokenizer_fingerprint, write_run_record)

SAMPLE_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "sample" / "tokenizer.json"

CONVERSATIONS = [[{"role": "prompter", "text": "hi"}, {"role": "assistant", "text": "hello"}],
                 [{"role": "prompter", "text": "2+2?"}, {"role": "assistant", "text": "4"}]]


def record(**changes):
    settings = dict(model=GPTNeoXConfig.from_name("tiny").to_hf(), dtype="fp32", world_size=2, zero_stage=2,
                    learning_rate=1e-3, warmup_steps=10, total_steps=100, num_train_epochs=2, max_length=64,
                    global_batch_size=16, rng_seed=7, train_set=CONVERSATIONS, tokenizer="0123456789abcdef",
                    lora=None, base_weights=None)
    return run_record(**{**settings, **changes})


def test_same_contents_same_fingerprint_other_text_differs():
    edited = [CONVERSATIONS[0], [{"role": "prompter", "text": "2+2?"}, {"role": "assistant", "text": "5"}]]
    assert dataset_fingerprint(CONVERSATIONS) == dataset_fingerprint([list(c) for c in CONVERSATIONS])
    assert dataset_fingerprint(edited) != dataset_fingerprint(CONVERSATIONS)  # same count, other contents
    assert dataset_fingerprint(CONVERSATIONS[::-1]) != dataset_fingerprint(CONVERSATIONS)


@pytest.mark.parametrize("change, message", [
    ({"model": GPTNeoXConfig.from_name("tiny", hidden_size=128).to_hf()},
     "hidden_size=64, this run has hidden_size=128; model cannot change across a resume"),
    ({"world_size": 1}, "world_size=2, this run has world_size=1; world_size cannot change"),
    ({"tokenizer": "fedcba9876543210"},
     "tokenizer='0123456789abcdef', this run has tokenizer='fedcba9876543210'; tokenizer cannot change"),
    ({"zero_stage": 1}, "zero_stage=2, this run has zero_stage=1"),
    ({"lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["dense"], "token_ids": []}},
     r"full fine-tuning \(lora_r=0\), this run has LoRA r=8, alpha=16.0, dropout=0.0, "
     r"target_modules=\['dense'\], token_ids=\[\]; lora cannot change across a resume"),
    ({"dtype": "bf16"}, "dtype='fp32', this run has dtype='bf16'; pass --allow_changed dtype if that is intended"),
    ({"learning_rate": 2e-3}, "learning_rate=0.001, this run has learning_rate=0.002"),
    ({"warmup_steps": 5}, "warmup_steps=10, this run has warmup_steps=5"),
    ({"total_steps": 200}, "total_steps=100, this run has total_steps=200"),
    ({"max_length": 128}, "max_length=64, this run has max_length=128"),
    ({"train_set": CONVERSATIONS[:1]}, "num_samples=2, dataset='[0-9a-f]{16}', this run has num_samples=1, "
                                       "dataset='[0-9a-f]{16}'; num_samples cannot change across a resume; "
                                       "--allow_changed dataset would accept the other$"),
    ({"train_set": CONVERSATIONS[::-1]}, "dataset='[0-9a-f]{16}', this run has dataset='[0-9a-f]{16}'"),
])
def test_each_difference_is_refused_in_one_line_naming_both_values(change, message):
    with pytest.raises(ResumeMismatch, match=f"^resume: ckpt/step5 was written with {message}") as err:
        check_resume(record(), record(**change), "ckpt/step5")
    assert "\n" not in str(err.value)


def test_every_difference_is_named_at_once_with_the_allow_changed_value_that_accepts_them():
    # one more epoch: two settings change; a refusal names both and the exact flag value
    with pytest.raises(ResumeMismatch) as err:
        check_resume(record(), record(total_steps=150, num_train_epochs=3), "c", allowed={"total_steps"})
    assert str(err.value) == ("resume: c was written with total_steps=100, num_train_epochs=2, this run has "
                              "total_steps=150, num_train_epochs=3; pass --allow_changed total_steps,num_train_epochs "
                              "if that is intended")
    assert check_resume(record(), record(total_steps=150, num_train_epochs=3), "c",
                        allowed={"total_steps", "num_train_epochs"}) == [
        "resume: total_steps changed from total_steps=100 to total_steps=150 (--allow_changed)",
        "resume: num_train_epochs changed from num_train_epochs=2 to num_train_epochs=3 (--allow_changed)"]
    # what can never change is said apart from what --allow_changed accepts
    with pytest.raises(ResumeMismatch) as err:
        check_resume(record(), record(world_size=1, tokenizer="fedcba9876543210", learning_rate=2e-3, max_length=32),
                     "c", sources={"tokenizer": ("c/model/tokenizer.json", "other.json")})
    assert str(err.value) == (
        "resume: c was written with tokenizer='0123456789abcdef' (c/model/tokenizer.json), world_size=2, "
        "learning_rate=0.001, max_length=64, this run has tokenizer='fedcba9876543210' (other.json), world_size=1, "
        "learning_rate=0.002, max_length=32; tokenizer, world_size cannot change across a resume; "
        "--allow_changed learning_rate,max_length would accept the others")


def test_tokenizer_fingerprint_tells_apart_the_same_size_with_other_ids(tmp_path):
    tokenizer = load_tokenizer(SAMPLE_TOKENIZER)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_tokenizer(SAMPLE_TOKENIZER))
    data = json.loads(SAMPLE_TOKENIZER.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]  # two ordinary tokens swap their ids
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(data))
    swapped = load_tokenizer(tmp_path / "swapped.json")
    assert swapped.get_vocab_size() == tokenizer.get_vocab_size()
    assert tokenizer_fingerprint(swapped) != tokenizer_fingerprint(tokenizer)
    plain = Tokenizer.from_file(str(SAMPLE_TOKENIZER))  # the same ids, without the chat tokens marked special
    assert tokenizer_fingerprint(plain) != tokenizer_fingerprint(tokenizer)


def test_allow_changed_waives_schedule_and_data_but_not_shapes_or_partitions():
    notes = check_resume(record(), record(learning_rate=2e-3, total_steps=300), "c",
                         allowed={"learning_rate", "total_steps"})
    assert notes == ["resume: learning_rate changed from learning_rate=0.001 to learning_rate=0.002 (--allow_changed)",
                     "resume: total_steps changed from total_steps=100 to total_steps=300 (--allow_changed)"]
    with pytest.raises(ResumeMismatch, match="--allow_changed world_size: world_size cannot change across a resume"):
        check_resume(record(), record(world_size=1), "c", allowed={"world_size"})
    with pytest.raises(ResumeMismatch, match="--allow_changed lr: not a resume check"):
        check_resume(record(), record(), "c", allowed={"lr"})
    assert set(FIXED).isdisjoint(WAIVABLE) and check_resume(record(), record(), "c") == []


def test_run_record_round_trip(tmp_path):
    assert read_run_record(tmp_path) is None  # a checkpoint from before run.json: nothing to compare
    write_run_record(tmp_path, record())
    assert read_run_record(tmp_path) == record()
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(ResumeMismatch, match="run.json: unreadable"):
        read_run_record(tmp_path)
    (tmp_path / "run.json").write_text("[1]")  # JSON, but not a record: callers would crash on .get
    with pytest.raises(ResumeMismatch, match=r"run.json: unreadable \(a JSON list, not an object\)"):
        read_run_record(tmp_path)
