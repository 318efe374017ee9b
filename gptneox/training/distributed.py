"""Process-group setup that works under the deepspeed launcher, torchrun, or a plain `python train.py`."""
from __future__ import annotations

import os
import socket

import deepspeed
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_environment() -> dict[str, str]:
    """What a launcher would set for one process; without it DeepSpeed falls back to MPI discovery."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def init_distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed through DeepSpeed if not yet done, with this
    process's accelerator selected by LOCAL_RANK."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        for key, value in single_process_environment().items():
            os.environ.setdefault(key, value)
    missing = [key for key in _LAUNCH_VARIABLES if key not in os.environ]
    if missing:
        raise RuntimeError(f"partial launch environment: {', '.join(missing)} not set "
                           f"(use the deepspeed launcher, torchrun, or set all of {', '.join(_LAUNCH_VARIABLES)})")
    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))  # before weights load onto "this" device
    if not dist.is_initialized():
        deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size()
