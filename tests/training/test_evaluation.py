"""The Evaluator: a set whose windows hold no trained token is reported as such, never as loss 0.0; packed
evaluation gives the padded figures."""
from __future__ import annotations

import logging

import pytest
import torch

from gptneox import GPTNeoX, GPTNeoXConfig
from gptneox.data import load_tokenizer
from gptneox.training.evaluation import Evaluator
from gptneox.training.stop import StopRequest

from tests.helpers import REPO


class _EvalEngine:
    """What evaluate() uses of a DeepSpeed engine, over a plain module."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)


def test_an_eval_set_without_trained_tokens_has_no_loss_and_is_named_once(caplog):
    tokenizer = load_tokenizer(REPO / "data" / "sample" / "tokenizer.json")
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size()))
    short = [{"role": "prompter", "text": "Hi"}, {"role": "assistant", "text": "Hello there"}]
    long_question = [{"role": "prompter", "text": "why " * 60}, {"role": "assistant", "text": "Because."}]
    evaluator = Evaluator({"short": [short], "long_questions": [long_question] * 3}, tokenizer, max_length=16,
                          batch_size=2, every=1, rank=0, world=1)
    stop = StopRequest()
    try:
        with caplog.at_level(logging.WARNING):
            first = evaluator.run(_EvalEngine(model), stop)
            second = evaluator.run(_EvalEngine(model), stop)
    finally:
        stop.restore()
    assert set(first) == set(second) == {"eval_short_loss", "eval_short_accuracy", "eval_loss", "eval_accuracy"}
    assert first["eval_short_loss"] > 0 and first["eval_loss"] == first["eval_short_loss"]  # the one set with tokens
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["eval set long_questions: its 3 conversations hold no trained (assistant) token within "
                        "max_length 16; it has no loss or accuracy"]


def test_packed_evaluation_gives_the_padded_figures():
    tokenizer = load_tokenizer(REPO / "data" / "sample" / "tokenizer.json")
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size()))
    conversations = [[{"role": "prompter", "text": "Hi " * (1 + i)},
                      {"role": "assistant", "text": "Hello " * (3 * i + 1)}] for i in range(5)]
    stop = StopRequest()
    try:
        figures = {}
        for pack in (False, True):
            evaluator = Evaluator({"set": conversations}, tokenizer, max_length=64, batch_size=3, every=1, rank=0,
                                  world=1, pack=pack)
            rows, collate = [], evaluator.collate

            def counting_rows(batch, collate=collate, rows=rows):
                collated = collate(batch)
                rows.append(collated["input_ids"].shape[0])
                return collated

            evaluator.collate = counting_rows
            figures[pack] = evaluator.run(_EvalEngine(model), stop)
            assert rows == ([1, 1] if pack else [3, 2])
    finally:
        stop.restore()
    padded, packed = figures[False], figures[True]
    assert padded.keys() == packed.keys() == {"eval_set_loss", "eval_set_accuracy", "eval_loss", "eval_accuracy"}
    assert abs(padded["eval_set_loss"] - packed["eval_set_loss"]) < 1e-5
    assert padded["eval_set_accuracy"] == packed["eval_set_accuracy"]


def test_the_overall_eval_loss_is_the_mean_over_every_sets_trained_tokens():
    """eval_loss (TensorBoard's eval/loss, the Trainer's tag) weighs each set by its trained tokens, so a
    small set does not count as much as a large one."""
    tokenizer = load_tokenizer(REPO / "data" / "sample" / "tokenizer.json")
    torch.manual_seed(0)
    model = GPTNeoX(GPTNeoXConfig.from_name("tiny", vocab_size=tokenizer.get_vocab_size()))
    short = [[{"role": "prompter", "text": "Hi"}, {"role": "assistant", "text": "Hello there"}]]
    long = [[{"role": "prompter", "text": f"Question {i}"}, {"role": "assistant", "text": "A long answer. " * (i + 3)}]
            for i in range(4)]
    sets = {"short": short, "long": long}
    stop = StopRequest()
    try:
        together = Evaluator(sets, tokenizer, max_length=128, batch_size=2, every=1, rank=0, world=1).run(
            _EvalEngine(model), stop)
    finally:
        stop.restore()
    tokens = {name: sum(len(tokenizer.encode(c[1]["text"]).ids) + 1 for c in convs) for name, convs in sets.items()}
    expected = sum(together[f"eval_{name}_loss"] * n for name, n in tokens.items()) / sum(tokens.values())
    assert together["eval_loss"] == pytest.approx(expected, rel=1e-3)
    assert together["eval_short_loss"] != pytest.approx(together["eval_long_loss"], rel=1e-3)  # a real weighing


@pytest.mark.parametrize("strategy, due_steps, at_end", [
    ("steps", [3, 6], True), ("epoch", [4, 8], False), ("no", [], False)])
def test_eval_strategy_says_when_to_evaluate(strategy, due_steps, at_end):
    """Epochs of 4 steps, eval_steps 3: the Trainer's eval_strategy values; the end of a run evaluates
    unless its last step just did, or the strategy is no."""
    tokenizer = load_tokenizer(REPO / "data" / "sample" / "tokenizer.json")
    evaluator = Evaluator({}, tokenizer, max_length=16, batch_size=1, every=3, rank=0, world=1, strategy=strategy)
    assert [step for step in range(1, 9) if evaluator.due(step, epoch_done=step % 4 == 0)] == due_steps
    assert evaluator.due_at_end(10, epoch_done=False) is (strategy != "no")
    assert evaluator.due_at_end(8, epoch_done=True) is at_end


def test_a_run_without_eval_sets_says_it_never_evaluates(workspace, tmp_path, capsys):
    """val_split 0 everywhere leaves no eval set: the start-up line says so (it ended in a bare "eval sets: ")."""
    import json

    from tests.training.runs import read_metrics, run_train

    data = json.dumps([{"vicuna": {"input_file_path": str(REPO / "data" / "sample" / "vicuna_sample.json"),
                                   "val_split": 0}}])
    assert run_train(workspace, tmp_path / "run", "--datasets", data, "--max_steps", "1") == 0
    assert "steps; eval sets: none (every dataset's val_split is 0): never evaluated" in capsys.readouterr().out
    assert not any("eval_loss" in record for record in read_metrics(tmp_path / "run"))
