"""Which samples each rank trains on at each optimizer step: a pure function of (seed, epoch, step).

Every epoch is a permutation seeded by (seed, epoch). Optimizer step s of an epoch takes the global batch
`perm[s*G:(s+1)*G]` (G = micro batch x accumulation x world size) and cuts it into contiguous pieces, one
per rank, then into micro-batches. So the set of samples in a step does not depend on the world size, and
resuming needs only (epoch, step) - no iterator state. An incomplete last global batch is dropped (a
different remainder every epoch), because ranks must run the same number of micro-batches per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gptneox.training.config import TrainConfigError


@lru_cache(maxsize=2)
def _permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


@dataclass(frozen=True)
class DataOrder:
    num_samples: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise TrainConfigError(f"the training set has {self.num_samples} samples, fewer than one global batch "
                             f"of {self.global_batch_size} (per_device_train_batch_size x "
                             f"gradient_accumulation_steps x world size)")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.num_samples, self.seed, epoch)

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices of optimizer step `step` (0-based within the epoch), all ranks together."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        g = self.global_batch_size
        return self.permutation(epoch)[step * g:(step + 1) * g]

    def micro_batches(self, epoch: int, step: int) -> list[list[int]]:
        """This rank's `gradient_accumulation_steps` micro-batches of sample indices for that step."""
        per_rank = self.micro_batch_size * self.gradient_accumulation_steps
        mine = self.global_batch(epoch, step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i * m:(i + 1) * m].tolist() for i in range(self.gradient_accumulation_steps)]
