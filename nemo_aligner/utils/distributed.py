"""Process-group set-up and the small collectives the rest of the library needs."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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
    device_id = current_device() if use_cuda else None  # binds NCCL to this rank's GPU (also for barrier)
    if "RANK" in os.environ:  # launched by torchrun / srun
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:  # left out of os.environ so that child processes do not inherit this group's port
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout, device_id=device_id)
    return current_device()


def current_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_world_size(devices: int, num_nodes: int, world_size: int) -> None:
    """trainer.devices x trainer.num_nodes must be the number of processes the launcher started."""
    if devices * num_nodes != world_size:
        raise ValueError(
            f"trainer.devices ({devices}) x trainer.num_nodes ({num_nodes}) = {devices * num_nodes}, but "
            f"{world_size} processes were launched; set them to match torchrun --nproc_per_node / --nnodes"
        )


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
