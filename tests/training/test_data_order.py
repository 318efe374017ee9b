"""Which samples each rank trains on at each step."""
from __future__ import annotations

import pytest

from gptneox.training.data_order import DataOrder


def test_global_batch_is_the_same_whatever_the_world_size():
    one = DataOrder(103, micro_batch_size=2, gradient_accumulation_steps=4, world_size=1, rank=0, seed=5)
    two = [DataOrder(103, 2, 2, 2, rank, 5) for rank in range(2)]
    assert one.steps_per_epoch == 12 and two[0].steps_per_epoch == 12
    for epoch in range(2):
        for step in range(12):
            flat_one = [i for mb in one.micro_batches(epoch, step) for i in mb]
            flat_two = [i for order in two for mb in order.micro_batches(epoch, step) for i in mb]
            assert flat_one == flat_two and len(set(flat_one)) == 8
    assert not (one.permutation(0) == one.permutation(1)).all()  # a new order every epoch
    epoch0 = [i for s in range(12) for mb in one.micro_batches(0, s) for i in mb]
    assert len(set(epoch0)) == 96  # no sample twice in an epoch


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        DataOrder(10, 4, 2, 2, 0, 0)
