"""torch.compile per decoder layer (the repeated block: one graph, reused by every layer)."""

from __future__ import annotations

import logging

from torch import nn

from nemo_aligner.engines.torch_native.fsdp import decoder_layers
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def apply_compile(model: nn.Module) -> None:
    """Compile each decoder layer in place. Shapes are made dynamic at the first new sequence length,
    so a run compiles a layer a couple of times, not once per padded length. Generation runs eager
    (torch.compiler.set_stance("force_eager") in the engine): its one-token steps and growing KV cache
    would only add graphs."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    log_rank0(logger, "applied torch.compile to %d decoder layers", len(layers))
