"""Process-group setup that works under the deepspeed launcher, torchrun, or a plain `python train.py`, and
the collectives the loop's parts share, which are no-ops in a single process without a process group."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

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
    import deepspeed
    from deepspeed.accelerator import get_accelerator

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


def is_distributed() -> bool:
    """True when a process group exists (even of one rank)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over all ranks when there are several; the tensor itself otherwise."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor
