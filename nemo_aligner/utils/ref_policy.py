"""The reference policy as a CPU copy of the weights, swapped into the live model on demand."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Union

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


class HasModule(Protocol):
    module: nn.Module


ModelLike = Union[nn.Module, HasModule]


def _as_module(model: ModelLike) -> nn.Module:
    return model if isinstance(model, nn.Module) else model.module


def reshard_fsdp(module: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state.

    After a no-grad forward FSDP2 keeps the root's parameters gathered, and `named_parameters`
    then yields the gathered copies; reading or writing those would miss the sharded weights
    that the optimizer and checkpoints use.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


@torch.no_grad()
def retrieve_model_state_dict_in_cpu(model: ModelLike) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter (this rank's shards for DTensors), pinned on CUDA hosts.

    Tied parameters appear once. The copy is independent of later updates to the model.
    """
    pin = torch.cuda.is_available()
    module = _as_module(model)
    reshard_fsdp(module)
    state = {}
    for name, param in module.named_parameters():
        local = _local(param).detach()
        copy = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
        copy.copy_(local)
        state[name] = copy
    return state


@torch.no_grad()
def _load_local_(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    reshard_fsdp(module)
    params = dict(module.named_parameters())
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise KeyError(f"state dict does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    locals_ = {name: _local(param) for name, param in params.items()}
    for name, local in locals_.items():  # validate everything before touching any weight
        if local.shape != state[name].shape:
            raise ValueError(f"{name}: state shape {tuple(state[name].shape)} != local shard {tuple(local.shape)}")
    for name, local in locals_.items():
        local.copy_(state[name], non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def cpu_weight_swap(model: ModelLike, ref_state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the model holds `ref_state_dict`'s weights; on exit (also on error) the
    training weights are restored bit for bit. Optimizer state and gradients are untouched."""
    module = _as_module(model)
    training = retrieve_model_state_dict_in_cpu(module)
    _load_local_(module, ref_state_dict)
    try:
        yield
    finally:
        _load_local_(module, training)
