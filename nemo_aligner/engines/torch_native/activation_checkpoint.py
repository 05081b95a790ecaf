"""Activation checkpointing per decoder layer: a layer's activations are recomputed in the backward
instead of kept, trading one more forward for memory that no longer grows with layers x tokens."""

from __future__ import annotations

import logging
from typing import Any

import torch.utils.checkpoint
from torch import nn

from nemo_aligner.engines.torch_native.fsdp import decoder_layers
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Make every decoder layer's call (its module hooks included, so FSDP gathers the weights again
    for the recomputation) run under non-reentrant torch.utils.checkpoint.

    The layer keeps its class name and its parameters their names: a subclass with the same name only
    overrides __call__, so checkpoints, weight buffers and HF export see the same model.
    """
    layers = decoder_layers(model)
    for layer in layers:
        cls = type(layer)
        layer.__class__ = type(cls.__name__, (cls,), {"__call__": _checkpointed_call(cls)})
    log_rank0(logger, "applied activation checkpointing to %d decoder layers", len(layers))


def _checkpointed_call(cls: type[nn.Module]) -> Any:
    def call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(cls.__call__, self, *args, use_reentrant=False, **kwargs)

    return call
