"""This rank's local weight shards copied to and from host buffers (the engine's host-weights capability).

The buffers hold each distinct parameter's local piece (a DTensor's local shard), by name; tied
parameters appear once. Copies in either direction are exact, so a reference policy can be held on
the host and swapped in and out any number of times.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from nemo_aligner.engines.torch_native.fsdp import reshard_fsdp


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _local_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded parameters' local tensors; FSDP units are resharded first so that these are the
    weights the optimizer updates, not the gathered copies a forward may have left behind."""
    reshard_fsdp(module)
    return {name: _local(param).detach() for name, param in module.named_parameters()}


@torch.no_grad()
def allocate_host_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Empty host buffers like this rank's local weights, pinned where CUDA exists."""
    pin = torch.cuda.is_available()
    return {name: torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
            for name, local in _local_params(module).items()}


@torch.no_grad()
def copy_weights_to_host(module: nn.Module, host: dict[str, torch.Tensor]) -> None:
    """host[name] <- this rank's local weight `name`, for every parameter."""
    locals_ = _local_params(module)
    _check_match(locals_, host)
    for name, local in locals_.items():
        host[name].copy_(local, non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.no_grad()
def copy_weights_from_host(module: nn.Module, host: dict[str, torch.Tensor]) -> None:
    """This rank's local weights <- host; everything is validated before any weight changes."""
    locals_ = _local_params(module)
    _check_match(locals_, host)
    for name, local in locals_.items():
        local.copy_(host[name], non_blocking=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _check_match(locals_: dict[str, torch.Tensor], host: dict[str, torch.Tensor]) -> None:
    if locals_.keys() != host.keys():
        missing, extra = sorted(locals_.keys() - host.keys()), sorted(host.keys() - locals_.keys())
        raise KeyError(f"host weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, local in locals_.items():
        if local.shape != host[name].shape:
            raise ValueError(f"{name}: host shape {tuple(host[name].shape)} != local shard {tuple(local.shape)}")
