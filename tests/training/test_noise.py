"""The filters drop exactly the messages DeepSpeed and torch really print, only inside their block."""
from __future__ import annotations

import logging
import warnings

import torch
from deepspeed.runtime.lr_schedules import WarmupDecayLR

from gptneox.training import noise

from tests.helpers import run_python


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _scheduler(total_steps: int) -> None:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    WarmupDecayLR(optimizer, total_num_steps=total_steps, warmup_max_lr=0.1, warmup_num_steps=10)


def test_the_scheduler_warning_is_dropped_inside_the_block_and_real_warnings_are_kept():
    logger, records = logging.getLogger(noise.DEEPSPEED_LOGGER), _Records()
    logger.addHandler(records)
    try:
        _scheduler(total_steps=100)
        assert records.messages == [noise.SCHEDULER_NOT_STARTED]  # DeepSpeed's exact text, on every construction
        records.messages.clear()
        with noise.deepspeed_log_dropped(noise.SCHEDULER_NOT_STARTED):
            _scheduler(total_steps=3)  # a schedule shorter than its warm-up: that one is real
        assert records.messages == ["total_num_steps 3 is less than warmup_num_steps 10"]
        records.messages.clear()
        _scheduler(total_steps=100)  # the block is over
        assert records.messages == [noise.SCHEDULER_NOT_STARTED]
    finally:
        logger.removeHandler(records)


def test_the_accelerator_fallback_warning_is_dropped_only_where_torch_sees_no_gpu(monkeypatch):
    logger, records = logging.getLogger(noise.DEEPSPEED_LOGGER), _Records()
    logger.addHandler(records)
    try:
        for devices, shown in ((0, []), (1, [noise.NO_ACCELERATOR_FOUND])):
            monkeypatch.setattr(torch.cuda, "device_count", lambda devices=devices: devices)
            with noise.deepspeed_import():
                logger.warning(noise.NO_ACCELERATOR_FOUND)
            assert records.messages == shown
    finally:
        logger.removeHandler(records)


# torch warns from inside the collective; one rank of a gloo group is enough to see its exact text
ALL_GATHER = """
import os, warnings, torch, torch.distributed as dist
from gptneox.training import noise
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
def gather():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # after any filter already in force
        dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
        warnings.warn("another FutureWarning", FutureWarning)
    return [str(w.message) for w in caught if w.category is FutureWarning]
assert gather() == [noise.ALL_GATHER_DEPRECATED, "another FutureWarning"], gather()
with noise.optimizer_step():
    assert gather() == ["another FutureWarning"], gather()
print("ok")
"""


def test_the_deprecated_collective_warning_is_dropped_inside_the_optimizer_step(monkeypatch):
    from gptneox.training.distributed import free_port
    monkeypatch.setenv("PORT", str(free_port()))
    done = run_python("-c", ALL_GATHER)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_filters_leave_global_state_as_they_found_it():
    filters = list(warnings.filters)
    with noise.optimizer_step(), noise.deepspeed_log_dropped("x"):
        pass
    assert warnings.filters == filters and logging.getLogger(noise.DEEPSPEED_LOGGER).filters == []
