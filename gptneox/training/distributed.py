"""Process-group setup that works under the deepspeed launcher, torchrun, or a plain `python train.py`, and
the collectives the loop's parts share, which are no-ops in a single process without a process group.

On a CPU, DeepSpeed JIT-compiles a shared-memory communication op when its backend starts. Its only use is
the all-reduce of tensor-parallel inference (TorchBackend.inference_all_reduce, which falls back to
torch.distributed's all-reduce without it); training's collectives all go through torch.distributed. The
op costs a C++ build (about a minute on two cores, per environment) and 69 MB of /dev/shm per rank that
DeepSpeed never unlinks, so every launch of several ranks would leave that behind; it is never loaded.
DeepSpeed's other JIT ops (CPU Adam for offload on a GPU host, FusedAdam) are cached inside the environment:
torch keys its build cache on the sources and compiler flags, and environments sharing
~/.cache/torch_extensions would rebuild them in turn.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from gptneox.errors import UserError

T = TypeVar("T")
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_environment() -> dict[str, str]:
    """What a launcher would set for one process; without it DeepSpeed falls back to MPI discovery."""
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def environment_extensions_dir() -> Path | None:
    """`torch_extensions` inside this virtual or conda environment, when it is one and writable."""
    in_environment = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix
    return Path(sys.prefix) / "torch_extensions" if in_environment and os.access(sys.prefix, os.W_OK) else None


def use_environment_extensions_dir() -> None:
    """Default TORCH_EXTENSIONS_DIR to the environment's own cache; a value the user set is kept."""
    directory = environment_extensions_dir()
    if "TORCH_EXTENSIONS_DIR" not in os.environ and directory is not None:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(directory)


@contextmanager
def without_comm_op() -> Iterator[None]:
    """DeepSpeed's backend started inside the block does not load the CPU communication op: it is marked
    incompatible for the one call (deepspeed.comm.torch.build_shm_op) that would build and load it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # not a CPU accelerator: there is no such op
        yield
        return
    compatible = deepspeed.ops.__compatible_ops__  # one dict, probed once; DeepSpeed reads it, never copies it
    saved = compatible.get(builder.NAME, False)
    compatible[builder.NAME] = False
    try:
        yield
    finally:
        compatible[builder.NAME] = saved


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
    use_environment_extensions_dir()
    if not dist.is_initialized():
        with without_comm_op():
            deepspeed.init_distributed()
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def process_group_of_this_run(raised_together: tuple[type[BaseException], ...]) -> Iterator[tuple[int, int]]:
    """(rank, world size) for the block, from init_distributed; a process group started here is destroyed when
    the block ends normally or with one of `raised_together` (errors every rank raises at the same point).
    A gloo or NCCL group left alive at interpreter exit can end a finished rank with "terminate called without
    an active exception" and a status the launcher reports as a failure. After any other error the group is
    left alone: destroying it could wait on a rank that never arrives."""
    started = not dist.is_initialized()
    rank, world = init_distributed()
    try:
        yield rank, world
    except raised_together:
        if started:
            dist.destroy_process_group()
        raise
    if started:
        dist.destroy_process_group()


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


def on_rank_zero(decide: Callable[[], T], share: bool = False) -> T | None:
    """Run `decide` on rank 0 only; its result there, and elsewhere None, or with `share` the same result (a
    picklable one) on every rank. When it raises a UserError, every rank raises it, so no rank goes on alone
    into a collective the others never reach."""
    error, result = None, None
    if not is_distributed() or dist.get_rank() == 0:
        try:
            result = decide()
        except UserError as err:
            error = err
    if world_size() > 1:
        box = [error, result if share else None]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
        if share:
            result = box[1]
    if error is not None:
        raise error
    return result
