"""This rank's local weight shards copied to and from buffers on the host or the device (the engine's
weight-buffers capability), and a fingerprint of the weights.

The buffers hold each distinct trained parameter's local piece (a DTensor's local shard), by name; tied
parameters appear once. Copies are exact in both directions when the buffers keep the parameters'
dtype; buffers in the compute dtype (bf16) hold exactly what the bf16 forward would use.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Sequence

import torch
import torch._dynamo
from torch import nn
from torch.distributed.tensor import DTensor

from nemo_aligner.engines.torch_native.fsdp import reshard_fsdp
from nemo_aligner.types import Weights, check_same_weights


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param


def _local_params(module: nn.Module) -> Weights:
    """The trained parameters' local tensors (every weight in full fine-tuning; the adapters under LoRA,
    whose frozen base never changes, so a copy of them is a copy of the model); FSDP units are resharded
    first so that these are the weights the optimizer updates, not the gathered copies a forward may have
    left behind."""
    reshard_fsdp(module)
    return {name: _local(param).detach() for name, param in module.named_parameters() if param.requires_grad}


@torch.no_grad()
def allocate_weights(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Weights:
    """Empty buffers like this rank's local weights on `device` (pinned host memory where CUDA
    exists), in `dtype` (None: the parameters' own)."""
    pin = device.type == "cpu" and torch.cuda.is_available()
    return {name: torch.empty(local.shape, dtype=dtype or local.dtype, device=device, pin_memory=pin)
            for name, local in _local_params(module).items()}


def copy_weights_to(module: nn.Module, buffers: Weights) -> None:
    """buffers[name] <- this rank's local weight `name`, for every parameter."""
    _copy(module, buffers, into_buffers=True)


def copy_weights_from(module: nn.Module, buffers: Weights, *, wait: bool = True) -> None:
    """This rank's local weights <- buffers; everything is validated before any weight changes.

    `wait=False` returns while copies from pinned host buffers may still be in flight (work queued
    after them on the device sees the new weights): the caller must synchronise before it writes
    to those buffers again.
    """
    _copy(module, buffers, into_buffers=False, wait=wait)


@torch.no_grad()
def _copy(module: nn.Module, buffers: Weights, *, into_buffers: bool, wait: bool = True) -> None:
    locals_ = _local_params(module)
    check_same_weights(locals_, buffers, "weight buffers")
    for name, local in locals_.items():
        destination, source = (buffers[name], local) if into_buffers else (local, buffers[name])
        destination.copy_(source, non_blocking=True)
    if wait and torch.cuda.is_available():
        torch.cuda.synchronize()  # the host side may read or reuse the buffers right after


def forward_order_groups(module: nn.Module, layers: Sequence[nn.Module], names: Sequence[str]) -> list[list[str]]:
    """`names` (parameter names of `module`) grouped as a forward first needs them: everything outside
    the decoder layers (embeddings, final norm, head: the first and last ops), then each layer's own."""
    path_of = {id(m): path for path, m in module.named_modules()}
    prefixes = [path_of[id(layer)] + "." for layer in layers]
    groups: list[list[str]] = [[] for _ in range(len(layers) + 1)]
    for name in names:
        owner = next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), -1)
        groups[owner + 1].append(name)
    return groups


@contextlib.contextmanager
def streamed_weights_from(module: nn.Module, buffers: Weights, layers: Sequence[nn.Module],
                          stream: torch.cuda.Stream | None) -> Iterator[None]:
    """This rank's local weights <- host `buffers` while the forwards inside the block run: on CUDA the
    copies go on `stream` one decoder layer at a time, and each layer's forward waits (a pre-hook) only
    for its own weights, so copying layer i+1 overlaps computing layer i; the weights outside the layers
    come first and everything after the block waits for all copies. Without a stream (CPU) the copies
    are done on entry. Names and shapes are validated before any weight changes."""
    if stream is None:
        copy_weights_from(module, buffers)
        yield
        return
    locals_ = _local_params(module)
    check_same_weights(locals_, buffers, "weight buffers")
    groups = forward_order_groups(module, layers, list(locals_))
    current = torch.cuda.current_stream()
    stream.wait_stream(current)  # the weights' earlier readers and writers finish first
    events = []
    with torch.no_grad(), torch.cuda.stream(stream):
        for names in groups:
            for name in names:
                locals_[name].copy_(buffers[name], non_blocking=True)
            events.append(stream.record_event())
    current.wait_event(events[0])
    ready = {layer: event for layer, event in zip(layers, events[1:])}

    @torch._dynamo.disable  # runs eagerly before a compiled layer's graph
    def wait_for_weights(layer: nn.Module, _args: object) -> None:
        torch.cuda.current_stream().wait_event(ready[layer])
        handles.pop(layer).remove()  # once is enough: later forwards (a captured decode step) see no hook

    handles = {layer: layer.register_forward_pre_hook(wait_for_weights) for layer in layers}
    try:
        yield
    finally:
        for handle in handles.values():
            handle.remove()
        current.wait_stream(stream)


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
