"""This rank's local weight shards copied to and from buffers on the host or the device (the engine's
weight-buffers capability), and a fingerprint of the weights.

The buffers hold each distinct parameter's local piece (a DTensor's local shard), by name; tied
parameters appear once. Copies are exact in both directions when the buffers keep the parameters'
dtype; buffers in the compute dtype (bf16) hold exactly what the bf16 forward would use.
"""

from __future__ import annotations

import hashlib

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
def allocate_weights(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Empty buffers like this rank's local weights on `device` (pinned host memory where CUDA
    exists), in `dtype` (None: the parameters' own)."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    return {name: torch.empty(local.shape, dtype=dtype or local.dtype, device=device, pin_memory=pin)
            for name, local in _local_params(module).items()}


@torch.no_grad()
def copy_weights_to(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """buffers[name] <- this rank's local weight `name`, for every parameter."""
    locals_ = _local_params(module)
    _check_match(locals_, buffers)
    for name, local in locals_.items():
        buffers[name].copy_(local, non_blocking=True)
    _wait_for_copies()


@torch.no_grad()
def copy_weights_from(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """This rank's local weights <- buffers; everything is validated before any weight changes."""
    locals_ = _local_params(module)
    _check_match(locals_, buffers)
    for name, local in locals_.items():
        local.copy_(buffers[name], non_blocking=True)
    _wait_for_copies()


@torch.no_grad()
def weights_fingerprint(module: nn.Module) -> str:
    """A digest of the weights, the same on every rank: per parameter the global sum and sum of squares
    (float64, through DTensor reductions). Summation order follows the layout, so another layout may
    give another digest: a cache keyed by it is then recomputed, never wrongly reused."""
    reshard_fsdp(module)
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        values = param.detach().to(torch.float64)
        sums = torch.stack([values.sum(), values.square().sum()])
        sums = sums.full_tensor() if isinstance(sums, DTensor) else sums
        digest.update(f"{name}:{tuple(param.shape)}:{sums[0].item():.10e}:{sums[1].item():.10e};".encode())
    return digest.hexdigest()


def _wait_for_copies() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _check_match(locals_: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    if locals_.keys() != buffers.keys():
        missing, extra = sorted(locals_.keys() - buffers.keys()), sorted(buffers.keys() - locals_.keys())
        raise KeyError(f"weight buffers do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, local in locals_.items():
        if local.shape != buffers[name].shape:
            raise ValueError(f"{name}: buffer shape {tuple(buffers[name].shape)} != local shard {tuple(local.shape)}")
