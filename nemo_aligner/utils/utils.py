"""NeMo-Aligner's public utility names, so existing user code imports unchanged.

Both delegate to the reference-policy code (nemo_aligner/reference/host_copy.py) through the
model's engine; nothing inside the library imports this module.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Protocol

import torch

from nemo_aligner.reference.host_copy import host_copy_of_weights, weights_swapped_in

if TYPE_CHECKING:
    from nemo_aligner.engines.base import Engine


class HasEngine(Protocol):
    """A model built on an engine, e.g. GPTModel and its DPO / SPIN / RS subclasses."""

    engine: Engine


def retrieve_model_state_dict_in_cpu(model: HasEngine) -> dict[str, torch.Tensor]:
    """A detached host copy of every parameter (this rank's shards), pinned on CUDA hosts.

    Tied parameters appear once. The copy is independent of later updates to the model.
    """
    return host_copy_of_weights(model.engine)


@contextlib.contextmanager
def cpu_weight_swap(model: HasEngine, ref_state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block the model holds `ref_state_dict`'s weights; on exit (also on error) the
    training weights are restored bit for bit. Optimizer state and gradients are untouched."""
    with weights_swapped_in(model.engine, ref_state_dict, stash=model.engine.allocate_host_weights()):
        yield
