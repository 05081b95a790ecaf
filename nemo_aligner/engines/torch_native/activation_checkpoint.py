"""Activation checkpointing per decoder layer: a layer keeps only its input for the backward and
recomputes the rest, trading one more forward of that layer for activation memory that no longer
grows with layers x tokens x width."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch.utils.checkpoint
from torch import nn

from nemo_aligner.engines.torch_native.fsdp import decoder_layers
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module, num_layers: int | None) -> None:
    """Checkpoint the `forward` of the first `num_layers` decoder layers (all when None), as NeMo's
    `activations_checkpoint_method: block` does: fewer layers recompute less and keep more memory.

    `forward` is wrapped, not `__call__`: module hooks (FSDP2's gathers) stay outside the recomputation,
    and a layer compiled afterwards (compile.py) traces the checkpoint into its graph, whose backward
    then recomputes the layer's fused kernels. One subclass per layer class, named as the class, keeps
    parameter names, checkpoints and HF export unchanged and lets every checkpointed layer share one
    compiled graph (a class per layer would recompile per layer and exhaust dynamo's recompile limit).
    """
    layers = decoder_layers(model)
    chosen = layers if num_layers is None else layers[:num_layers]
    subclasses: dict[type, type] = {}
    for layer in chosen:
        cls = type(layer)
        if cls not in subclasses:
            subclasses[cls] = type(cls.__name__, (cls,), {"forward": _checkpointed(cls.forward)})
        layer.__class__ = subclasses[cls]
    log_rank0(logger, "applied activation checkpointing to %d of %d decoder layers", len(chosen), len(layers))


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # scoring and generation: nothing to recompute
            return forward(self, *args, **kwargs)
        # The engine keeps dropout off (eval mode): nothing random to replay, so no RNG state is kept
        return torch.utils.checkpoint.checkpoint(forward, self, *args, use_reentrant=False, preserve_rng_state=False,
                                                 **kwargs)

    return checkpointed_forward
