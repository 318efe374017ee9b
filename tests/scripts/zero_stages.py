"""Run by tests/training/test_partitioned.py under `deepspeed --num_gpus 2`, with a pretrained tiny model
directory (a 1024-row vocabulary) and an output folder as its last two arguments. Each rank writes what it
saw to its own file there (two ranks' output lines can interleave on the launcher's stdout):

- the largest difference between a model built into ZeRO-3 partitions and the same model built whole,
  from the same seed (random init) and from the pretrained directory (weights streamed, vocabulary grown
  to 1552 rows);
- the losses of three training steps in which rank 1's first micro-batch has no sample (the collator
  dropped them all), and a weight checksum after them, under ZeRO-2 and under ZeRO-3 (ZeRO-2 first:
  ZeRO-3's partitioning changes the process's modules for good).
"""
import json
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402
from gptneox.training.config import TrainConfig  # noqa: E402
from gptneox.training.distributed import init_distributed  # noqa: E402
from gptneox.training.ds_config import load_ds_config, resolve_ds_config  # noqa: E402
from gptneox.training.model_setup import parameter_groups  # noqa: E402
from gptneox.training.partitioned import build_partitioned, load_partitioned  # noqa: E402
from gptneox.training.step import train_step  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pretrained, out = Path(sys.argv[-2]), Path(sys.argv[-1])
rank, world = init_distributed()
# adam_epsilon 1e-6: see RUN in tests/training/test_partitioned.py (the key biases' noise gradients)
cfg = TrainConfig(dtype="fp32", per_device_train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3,
                  warmup_steps=0, adam_epsilon=1e-6)


def ds_config(stage: int) -> dict:
    template = load_ds_config(REPO / ("ds_config_zero3.json" if stage == 3 else "ds_config.json"))
    del template["scheduler"]
    return resolve_ds_config(template, cfg, world_size=world, hidden_size=64, total_num_steps=3, cpu=True)[0]


def largest_difference(partitioned: GPTNeoX, whole: GPTNeoX) -> float:
    worst = 0.0
    for (name, p), (whole_name, w) in zip(partitioned.named_parameters(), whole.named_parameters()):
        assert name == whole_name
        with deepspeed.zero.GatheredParameters([p]):
            worst = max(worst, (p.data - w.data).abs().max().item())
    return worst


def batch(empty: bool) -> dict:
    if empty:  # what DialogueCollator returns when it drops every sample
        none = torch.zeros((0, 0), dtype=torch.long)
        return {"input_ids": none, "targets": none, "attention_mask": none, "position_ids": none,
                "loss_mask": none.bool()}
    ids = torch.randint(0, 1024, (1, 12))
    return {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(12)[None], "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


def train_with_an_empty_micro_batch(model: GPTNeoX, stage: int) -> tuple[list[float], float]:
    """The losses of three steps and a checksum of the weights after them. Every rank must still reduce
    the same gradients (and under ZeRO-3 join the same weight gathers), or the collectives mismatch: gloo
    aborts, NCCL hangs."""
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.0),
                                      config=ds_config(stage))
    torch.manual_seed(1 + rank)
    losses = [train_step(engine, [batch(empty=rank == 1 and step == 0)]).loss for step in range(3)]
    parameters = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(parameters, enabled=stage == 3):
        return losses, sum(p.detach().double().sum().item() for p in parameters)


config = GPTNeoXConfig.from_name("tiny", vocab_size=1552)
torch.manual_seed(0)
whole = GPTNeoX(config)
zero2 = train_with_an_empty_micro_batch(whole, stage=2)

torch.manual_seed(0)
whole = GPTNeoX(config)
torch.manual_seed(0)
random_init = build_partitioned(config, ds_config(3))
random_init_difference = largest_difference(random_init, whole)

loaded = GPTNeoX.from_pretrained(pretrained)
loaded.resize_token_embeddings(config.vocab_size)
streamed = build_partitioned(config, ds_config(3))
load_partitioned(streamed, pretrained, GPTNeoXConfig.from_hf(pretrained))
streamed_difference = largest_difference(streamed, loaded)

zero3 = train_with_an_empty_micro_batch(random_init, stage=3)
(out / f"rank{rank}.json").write_text(json.dumps({
    "random_init_difference": random_init_difference, "streamed_difference": streamed_difference,
    "streamed_rows": list(streamed.embed_out.weight.ds_shape), "zero2_losses": zero2[0], "zero2_checksum": zero2[1],
    "zero3_losses": zero3[0], "zero3_checksum": zero3[1]}))
