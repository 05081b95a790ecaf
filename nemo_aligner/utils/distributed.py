"""Process-group set-up and the small collectives the rest of the library needs."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelDims:
    """The (dp, tp) layout of the job; dp is derived from the world size."""

    dp: int
    tp: int

    @classmethod
    def from_world(cls, world_size: int, tp: int) -> "ParallelDims":
        if world_size % tp != 0:
            raise ValueError(
                f"model.tensor_model_parallel_size={tp} does not divide the world size {world_size} "
                "(trainer.devices x trainer.num_nodes processes); choose a divisor of it"
            )
        return cls(dp=world_size // tp, tp=tp)


def init_distributed(timeout_minutes: int = 30) -> torch.device:
    """Join the torchrun process group (or start a one-process one) and return this rank's device.

    NCCL on GPU, gloo on CPU. A plain `python script.py` gets a world of one, so every code path
    is the distributed one.
    """
    if dist.is_initialized():
        return current_device()
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:  # launched by torchrun / srun
        dist.init_process_group(backend, timeout=timeout)
    else:  # left out of os.environ so that child processes do not inherit this group's port
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    return current_device()


def current_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh:
    """A 2-D (dp, tp) device mesh; tp is the inner (fastest varying) dimension."""
    mesh = init_device_mesh(device.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
    log_rank0(logger, "device mesh: dp=%d tp=%d on %s", dims.dp, dims.tp, device.type)
    return mesh


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log_rank0(log: logging.Logger, msg: str, *args: object) -> None:
    if is_rank0():
        log.info(msg, *args)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over `group` in place (a no-op for a group of one) and return the tensor."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Element-wise max over `group` in place (a no-op for a group of one); min is -max(-x)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
