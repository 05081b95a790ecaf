"""The reference as a copy of the weights, swapped into the network when it is used.

Two strategies share this class:
- swap (NeMo-Aligner's: retrieve_model_state_dict_in_cpu / cpu_weight_swap): the copy lives in host
  memory and costs no device memory; each use moves it host -> device, with the training weights
  kept aside in a host buffer meanwhile;
- resident: the copy lives on the device in the compute dtype (bf16 under mixed precision: exactly
  the values the forward uses), with the training weights kept aside on the device: no host traffic.
Both the copy and the buffer for the training weights are allocated once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from nemo_aligner.engines.base import Engine, WeightPlace
from nemo_aligner.reference.base import sum_over_scored
from nemo_aligner.types import Batch, Weights, check_same_weights


def copy_of_weights(engine: Engine, where: WeightPlace, *, compute_dtype: bool = False) -> Weights:
    """A new copy of this rank's weights on the host (pinned where CUDA exists) or the device, in the
    weights' dtype or the compute dtype, independent of later updates."""
    copy = engine.allocate_weights(where, compute_dtype=compute_dtype)
    engine.copy_weights_to(copy)
    return copy


@contextlib.contextmanager
def weights_swapped_in(engine: Engine, weights: Weights, *, stash: Weights) -> Iterator[None]:
    """Inside the block the network holds `weights`; the training weights wait in `stash` and are
    restored bit for bit on exit, also on error. Optimizer state and gradients are untouched."""
    engine.copy_weights_to(stash)
    engine.copy_weights_from(weights)  # checks names and shapes before changing anything
    try:
        yield
    finally:
        engine.copy_weights_from(stash)


class WeightCopyReference:
    """ReferencePolicy holding the reference as a copy of the weights (see the module docstring)."""

    def __init__(self, engine: Engine, *, resident: bool) -> None:
        """Takes the network's current weights as the reference."""
        self.engine = engine
        self.place: WeightPlace = "device" if resident else "host"
        self.weights = copy_of_weights(engine, self.place, compute_dtype=resident)
        self._stash: Weights | None = None
        self._active = False

    @property
    def name(self) -> str:
        return "resident" if self.place == "device" else "swap"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self._active:  # a nested swap would stash the reference over the training weights
            raise RuntimeError("the reference is already active; its blocks cannot nest")
        if self._stash is None:
            self._stash = self.engine.allocate_weights(self.place)
        self._active = True
        try:
            with weights_swapped_in(self.engine, self.weights, stash=self._stash):
                yield
        finally:
            self._active = False

    def set_weights(self, weights: Weights) -> None:
        """Make `weights` (this rank's local pieces, by name, as copy_of_weights gives) the
        reference; copied into the existing buffers after names and shapes are checked."""
        check_same_weights(self.weights, weights, "reference weights")
        for name, buffer in self.weights.items():
            buffer.copy_(weights[name])

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        with self.active():
            return self.engine.logprobs(micro_batches)

    def sequence_logps(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        return sum_over_scored(self.logprobs(micro_batches), micro_batches)

    def become_current_policy(self) -> None:
        self.engine.copy_weights_to(self.weights)

    def save(self, path: str) -> None:
        with self.active():
            self.engine.save_weights(path)

    def load(self, path: str) -> None:
        with self.active():
            self.engine.load(path, with_optimizer=False)
            self.engine.copy_weights_to(self.weights)
