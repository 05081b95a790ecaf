"""Data-parallel sharding with FSDP2 (fully_shard), one unit per decoder layer plus the root."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found through HF's own `_no_split_modules` class names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules match)")
    return layers


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool) -> None:
    """Shard parameters, gradients and optimizer state over `dp_mesh`; compute in `param_dtype`.

    The stored weights keep their dtype (fp32 masters under mixed precision); `reduce_dtype` fp32 keeps
    gradient reductions exact enough for layout parity. At dp=1 (model.data_parallel_sharding=fsdp)
    `reshard_after_forward=False` keeps each layer's compute-dtype copy for its backward instead of
    casting it again (resharding would free nothing another rank holds).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    log_rank0(logger, "applied FSDP2 over %d ranks (param %s, reduce %s)", dp_mesh.size(), param_dtype, reduce_dtype)


@contextlib.contextmanager
def gathered_for_decoding(model: nn.Module, *, layers_reshard_after_forward: bool) -> Iterator[None]:
    """Keep every FSDP unit gathered across the many one-token forwards of a generate call.

    Otherwise each decode step re-runs the all-gather (and bf16 cast) of every unit, which
    dominates decoding time. On exit the layers get back their setting (apply_fsdp's), the root
    its own (stay gathered until backward), and everything is resharded.
    """
    if not isinstance(model, FSDPModule):  # replicated: the weights are always whole
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(layers_reshard_after_forward)
        model.set_reshard_after_forward(False, recurse=False)
        reshard_fsdp(model)


def reshard_fsdp(module: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state.

    After a no-grad forward FSDP2 keeps the root's parameters gathered, and `named_parameters`
    then yields the gathered copies; reading or writing those would miss the sharded weights
    that the optimizer and checkpoints use.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
