"""DialogueCollator: the masking rule in padded and packed modes, truncation windows, drops, determinism."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from gptneox.data import ConversationError, DialogueCollator, load_tokenizer
from gptneox.data.formatting import ConversationTokenizer

TOKENIZER = load_tokenizer(Path(__file__).resolve().parents[2] / "data" / "sample" / "tokenizer.json")
EOS, PAD = TOKENIZER.token_to_id("<|endoftext|>"), TOKENIZER.token_to_id("<|padding|>")
ROLE_IDS = {TOKENIZER.token_to_id(t) for t in ("<|prompter|>", "<|assistant|>", "<|system|>")}


def decode(ids) -> str:
    return TOKENIZER.decode([int(i) for i in ids], skip_special_tokens=False)


def replies_text(conversation) -> str:
    return "".join(m["text"] + "<|endoftext|>" for m in conversation if m["role"] == "assistant")


def segments(batch):
    """(row, slice) of every sample in the batch, in row order."""
    spans = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        if "segment_ids" not in batch:
            spans.append((row, slice(0, int(real.sum()))))
            continue
        seg = batch["segment_ids"][row]
        for s in torch.unique(seg[real]).tolist():
            where = torch.nonzero((seg == s) & real).flatten()
            spans.append((row, slice(int(where[0]), int(where[-1]) + 1)))
    return spans


words = st.text(alphabet="abcdefghij klmnopqrst.,?!'\n0123", min_size=0, max_size=30)


@st.composite
def conversations(draw, max_turns=6):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "text": draw(words)})
    turns = draw(st.integers(1, max_turns // 2)) * 2
    for index in range(turns):
        messages.append({"role": ("prompter", "assistant")[index % 2], "text": draw(words)})
    return messages


QA = [{"role": "prompter", "text": "What is a meme?"}, {"role": "assistant", "text": "An idea that spreads."}]


def test_single_turn_padded_batch():
    batch = DialogueCollator(TOKENIZER, max_length=512)([QA])
    assert set(batch) == {"input_ids", "targets", "loss_mask", "attention_mask", "position_ids"}
    assert all(t.shape == batch["input_ids"].shape for t in batch.values())
    assert batch["input_ids"].shape[1] % 16 == 0
    assert batch["loss_mask"].dtype == torch.bool
    assert decode(batch["targets"][batch["loss_mask"]]) == "An idea that spreads.<|endoftext|>"
    n = int(batch["attention_mask"].sum())
    assert decode(batch["input_ids"][0, :n]) == "<|prompter|>What is a meme?<|endoftext|><|assistant|>An idea that spreads.<|endoftext|>"
    assert (batch["input_ids"][0, n:] == PAD).all()
    assert not batch["loss_mask"][0, n - 1:].any()
    assert torch.equal(batch["position_ids"][0], torch.arange(batch["input_ids"].shape[1]))


def test_reference_quirks_are_not_reproduced():
    """No loss on the <|prompter|> after a reply, on <|assistant|>, or on a leading system message."""
    conversation = [{"role": "system", "text": "Be kind."}] + QA + [
        {"role": "prompter", "text": "More?"}, {"role": "assistant", "text": "Sure."}]
    batch = DialogueCollator(TOKENIZER, max_length=512)([conversation])
    trained = batch["targets"][batch["loss_mask"]]
    assert not set(trained.tolist()) & ROLE_IDS
    assert decode(trained) == "An idea that spreads.<|endoftext|>Sure.<|endoftext|>"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_convs=st.lists(conversations(), min_size=1, max_size=5), pack=st.booleans())
def test_trained_targets_are_exactly_the_replies(batch_convs, pack):
    collate = DialogueCollator(TOKENIZER, max_length=512, pack=pack, seed=1)
    batch = collate(batch_convs)
    assert collate.dropped == 0
    spans = segments(batch)
    assert len(spans) == len(batch_convs)  # every sample is in the batch, none dropped
    found = sorted(decode(batch["targets"][r, s][batch["loss_mask"][r, s]]) for r, s in spans)
    assert found == sorted(replies_text(c) for c in batch_convs)
    # loss only where attention is on, and never on padding
    assert not (batch["loss_mask"] & (batch["attention_mask"] == 0)).any()
    for r, s in spans:
        ids, targets = batch["input_ids"][r, s], batch["targets"][r, s]
        assert torch.equal(targets[:-1], ids[1:])  # targets are the next token inside a sample
        assert not batch["loss_mask"][r, s.stop - 1]  # a sample's last target never crosses its end
        if pack:
            assert torch.equal(batch["position_ids"][r, s], torch.arange(s.stop - s.start))
    if not pack:
        assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])


def _expected_windows(conversation, max_length):
    """Every window the collator may cut, with its loss mask, computed from the full token sequence."""
    tokens = ConversationTokenizer(TOKENIZER)(conversation)
    n = len(tokens.ids)
    starts = range(0, n - max_length + 1) if n > max_length else [0]
    windows = []
    for start in starts:
        end = min(n, start + max_length)
        mask = [tokens.in_reply[t + 1] if t + 1 < end else False for t in range(start, end)]
        windows.append((tokens.ids[start:end], mask))
    return windows


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations(max_turns=8), max_length=st.integers(4, 40), pack=st.booleans(),
       probability=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 100))
def test_windows_keep_the_mask_role_correct(conversation, max_length, pack, probability, seed):
    collate = DialogueCollator(TOKENIZER, max_length=max_length, random_offset_probability=probability,
                               pack=pack, seed=seed)
    batch = collate([conversation])
    windows = _expected_windows(conversation, max_length)
    if collate.dropped:
        assert batch["input_ids"].shape == (0, 0)
        candidates = windows[:1] if probability == 0.0 else windows
        assert any(not any(mask) for _, mask in candidates)
        return
    (r, s), = segments(batch)
    ids = batch["input_ids"][r, s].tolist()
    mask = batch["loss_mask"][r, s].tolist()
    assert len(ids) <= max_length
    assert (ids, mask) in windows
    if probability == 0.0:
        assert (ids, mask) == windows[0]  # evaluation: the end is cut, no random window


def test_random_windows_vary_and_evaluation_cuts_the_end():
    long = [{"role": "prompter", "text": "tell me"}, {"role": "assistant", "text": "a b c d e f " * 30}]
    train = DialogueCollator(TOKENIZER, max_length=32, random_offset_probability=1.0, seed=3)
    starts = {tuple(train([long])["input_ids"][0, :4].tolist()) for _ in range(20)}
    assert train.dropped == 0 and len(starts) > 1
    evaluate = DialogueCollator(TOKENIZER, max_length=32, random_offset_probability=0.0, seed=3)
    first = evaluate([long])["input_ids"][0, 0].item()
    assert first == TOKENIZER.token_to_id("<|prompter|>")


def test_same_seed_same_batches_and_windows_keyed_by_epoch_and_sample_id():
    long = [{"role": "prompter", "text": "q " * 30}, {"role": "assistant", "text": "x y z " * 40}]
    a = DialogueCollator(TOKENIZER, max_length=24, seed=7)
    b = DialogueCollator(TOKENIZER, max_length=24, seed=7)
    for _ in range(5):
        assert torch.equal(a([long, long])["input_ids"], b([long, long])["input_ids"])
    # resume, other world sizes: with sample ids a window depends only on (seed, epoch, sample id),
    # not on earlier calls nor on which batch or position the conversation lands in
    fresh = DialogueCollator(TOKENIZER, max_length=24, seed=7)
    for collate in (fresh, a):
        collate.set_epoch(2)
    together = fresh([long] * 4, sample_ids=[5, 6, 7, 8])["input_ids"]
    apart = torch.cat([a([long], sample_ids=[i])["input_ids"] for i in (7, 5, 8, 6)])
    assert torch.equal(together, apart[[1, 3, 0, 2]])
    assert len({tuple(row) for row in together.tolist()}) > 1  # different ids, different windows
    a.set_epoch(3)
    assert not torch.equal(a([long] * 4, sample_ids=[5, 6, 7, 8])["input_ids"], together)
    with pytest.raises(ValueError, match="2 sample_ids for 1 conversations"):
        a([long], sample_ids=[1, 2])


def test_packing_lays_every_conversation_in_one_row_padded_only_to_the_multiple():
    short = [{"role": "prompter", "text": "hi"}, {"role": "assistant", "text": "hello"}]
    long = [{"role": "prompter", "text": "tell me"}, {"role": "assistant", "text": "a b c d e f " * 30}]
    lengths = [len(ConversationTokenizer(TOKENIZER)(c).ids) for c in (short, long)]
    collate = DialogueCollator(TOKENIZER, max_length=64, random_offset_probability=0.0, pack=True,
                               pad_to_multiple_of=16)
    batch = collate([short, long, short])
    real = [lengths[0], 64, lengths[0]]  # max_length cuts each conversation, not the row
    width = -(-sum(real) // 16) * 16
    assert sum(real) > 64 and all(v.shape == (1, width) for v in batch.values())
    assert int(batch["attention_mask"].sum()) == sum(real)
    cursor = 0
    for segment, n in enumerate(real):
        span = slice(cursor, cursor + n)
        assert (batch["segment_ids"][0, span] == segment).all()
        assert torch.equal(batch["position_ids"][0, span], torch.arange(n))
        cursor += n
    assert cursor < width  # here the rounding left padding: a segment of its own, positions from 0, untrained
    assert (batch["segment_ids"][0, cursor:] == len(real)).all()
    assert torch.equal(batch["position_ids"][0, cursor:], torch.arange(width - cursor))
    assert not batch["loss_mask"][0, cursor:].any() and not batch["attention_mask"][0, cursor:].any()

    unpadded = DialogueCollator(TOKENIZER, max_length=64, random_offset_probability=0.0, pack=True,
                                pad_to_multiple_of=None)([short, long, short])
    assert unpadded["input_ids"].shape == (1, sum(real)) and bool(unpadded["attention_mask"].all())
    assert torch.equal(unpadded["input_ids"][0], batch["input_ids"][0, :sum(real)])


def test_samples_without_trained_tokens_are_dropped_and_counted():
    long_question = [{"role": "prompter", "text": "why " * 50}, {"role": "assistant", "text": "because"}]
    no_reply = [{"role": "prompter", "text": "anyone?"}]
    collate = DialogueCollator(TOKENIZER, max_length=16, random_offset_probability=0.0)
    batch = collate([long_question, QA, no_reply])
    assert collate.dropped == 2
    assert batch["input_ids"].shape[0] == 1
    assert decode(batch["targets"][batch["loss_mask"]]) == "An idea that spreads.<|endoftext|>"
    empty = collate([no_reply])
    assert collate.dropped == 3
    assert all(t.shape == (0, 0) for t in empty.values())
    assert empty["loss_mask"].dtype == torch.bool and empty["input_ids"].dtype == torch.long


def test_bad_sample_names_its_index():
    collate = DialogueCollator(TOKENIZER, max_length=64)
    with pytest.raises(ConversationError, match="sample 1 of the batch: message 0 has unknown role 'bot'"):
        collate([QA, [{"role": "bot", "text": "x"}]])
    with pytest.raises(ConversationError, match="sample 0 of the batch: expected a list"):
        collate(["not a conversation"])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 1}, "max_length"),
    ({"random_offset_probability": 1.5}, "random_offset_probability"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DialogueCollator(TOKENIZER, **kwargs)


def test_plain_string_conversations_are_accepted():
    batch = DialogueCollator(TOKENIZER, max_length=128)([["q", "answer one", "q2", "answer two"]])
    assert decode(batch["targets"][batch["loss_mask"]]) == "answer one<|endoftext|>answer two<|endoftext|>"
