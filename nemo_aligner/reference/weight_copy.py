"""The reference as a copy of the weights, swapped into the network when it is used.

Two strategies share this class:
- swap (NeMo-Aligner's: retrieve_model_state_dict_in_cpu / cpu_weight_swap): the copy lives in pinned
  host memory and costs no device memory; each use moves it host -> device;
- resident: the copy lives on the device in the compute dtype (bf16 under mixed precision: exactly
  the values the forward uses): no host traffic.
The engine swaps it in (Engine.swapped_weights) and brings the training weights back: from the fp32
masters on the device where it keeps them apart (replicated bf16 training), else from a stash it
allocates once.
"""

from __future__ import annotations

from typing import ContextManager

from nemo_aligner.engines.base import Engine, WeightPlace
from nemo_aligner.reference.base import ComputedOnThePolicyNetwork
from nemo_aligner.types import Weights, check_same_weights


def copy_of_weights(engine: Engine, where: WeightPlace, *, compute_dtype: bool = False) -> Weights:
    """A new copy of this rank's weights on the host (pinned where CUDA exists) or the device, in the
    weights' dtype or the compute dtype, independent of later updates."""
    copy = engine.allocate_weights(where, compute_dtype=compute_dtype)
    engine.copy_weights_to(copy)
    return copy


class WeightCopyReference(ComputedOnThePolicyNetwork):
    """ReferencePolicy holding the reference as a copy of the weights (see the module docstring)."""

    def __init__(self, engine: Engine, *, resident: bool) -> None:
        """Takes the network's current weights as the reference."""
        self.engine = engine
        self.place: WeightPlace = "device" if resident else "host"
        self.weights = copy_of_weights(engine, self.place, compute_dtype=resident)

    @property
    def name(self) -> str:
        return "resident" if self.place == "device" else "swap"

    def active(self) -> ContextManager[None]:
        return self.engine.swapped_weights(self.weights)

    def set_weights(self, weights: Weights) -> None:
        """Make `weights` (this rank's local pieces, by name, as copy_of_weights gives) the
        reference; copied into the existing buffers after names and shapes are checked."""
        check_same_weights(self.weights, weights, "reference weights")
        for name, buffer in self.weights.items():
            buffer.copy_(weights[name])

    def become_current_policy(self) -> None:
        self.engine.copy_weights_to(self.weights)

    def save(self, path: str) -> None:
        with self.active():
            self.engine.save_weights(path)

    def load(self, path: str) -> None:
        with self.active():
            self.engine.load(path, with_optimizer=False)
            self.engine.copy_weights_to(self.weights)
