"""Run by tests/test_training_engine.py under `deepspeed --num_gpus 2`: rank 1's first micro-batch has no
sample left (the collator dropped them all). Every rank must still reduce the same gradients, or ZeRO-2's
collectives mismatch (gloo aborts, NCCL hangs). Each rank writes its losses and a weight checksum to
its own file in the folder given as the last argument (the launcher puts --local_rank first): two ranks'
output lines can interleave on the launcher's stdout."""
import json
import sys
from pathlib import Path

import deepspeed
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gptneox import GPTNeoX, GPTNeoXConfig  # noqa: E402
from gptneox.training.distributed import init_distributed  # noqa: E402
from gptneox.training.step import train_step  # noqa: E402

rank, world = init_distributed()
torch.manual_seed(0)
model = GPTNeoX(GPTNeoXConfig.from_name("tiny"))
config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
          "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 2}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)


def batch(empty: bool) -> dict:
    if empty:  # what DialogueCollator returns when it drops every sample
        none = torch.zeros((0, 0), dtype=torch.long)
        return {"input_ids": none, "targets": none, "attention_mask": none, "position_ids": none,
                "loss_mask": none.bool()}
    ids = torch.randint(0, 1024, (1, 12))
    return {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(12)[None], "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


torch.manual_seed(1 + rank)
losses = [train_step(engine, [batch(empty=rank == 1 and step == 0)]).loss for step in range(3)]
checksum = sum(p.detach().double().sum().item() for p in engine.module.parameters())
(Path(sys.argv[-1]) / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "checksum": checksum}))
