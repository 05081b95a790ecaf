"""The reference as a host copy of the weights, swapped into the network when it is used.

This is NeMo-Aligner's strategy (its retrieve_model_state_dict_in_cpu / cpu_weight_swap): the copy
costs no device memory, and each use moves the weights host -> device and back. Both the reference
copy and the stash that keeps the training weights meanwhile are allocated once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from nemo_aligner.engines.base import Engine
from nemo_aligner.types import Batch

HostWeights = dict[str, torch.Tensor]


def host_copy_of_weights(engine: Engine) -> HostWeights:
    """A new host copy of this rank's weights (pinned where CUDA exists), independent of later updates."""
    host = engine.allocate_host_weights()
    engine.copy_weights_to_host(host)
    return host


@contextlib.contextmanager
def weights_swapped_in(engine: Engine, weights: HostWeights, *, stash: HostWeights) -> Iterator[None]:
    """Inside the block the network holds `weights`; the training weights wait in `stash` and are
    restored bit for bit on exit, also on error. Optimizer state and gradients are untouched."""
    engine.copy_weights_to_host(stash)
    engine.copy_weights_from_host(weights)  # checks names and shapes before changing anything
    try:
        yield
    finally:
        engine.copy_weights_from_host(stash)


class HostCopyReference:
    """ReferencePolicy holding the reference as host weights (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        """Takes the network's current weights as the reference."""
        self.engine = engine
        self.weights = host_copy_of_weights(engine)
        self._stash: HostWeights | None = None
        self._active = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self._active:  # a nested swap would stash the reference over the training weights
            raise RuntimeError("the reference is already active; its blocks cannot nest")
        if self._stash is None:
            self._stash = self.engine.allocate_host_weights()
        self._active = True
        try:
            with weights_swapped_in(self.engine, self.weights, stash=self._stash):
                yield
        finally:
            self._active = False

    def set_weights(self, weights: HostWeights) -> None:
        """Make `weights` (this rank's local pieces, by name, as host_copy_of_weights gives) the
        reference; copied into the existing host buffers after names and shapes are checked."""
        if weights.keys() != self.weights.keys():
            missing, extra = sorted(self.weights.keys() - weights.keys()), sorted(weights.keys() - self.weights.keys())
            raise KeyError(f"reference weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, buffer in self.weights.items():
            if buffer.shape != weights[name].shape:
                raise ValueError(f"reference weight {name}: shape {tuple(weights[name].shape)} != {tuple(buffer.shape)}")
        for name, buffer in self.weights.items():
            buffer.copy_(weights[name])

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        with self.active():
            return self.engine.logprobs(micro_batches)

    def become_current_policy(self) -> None:
        self.engine.copy_weights_to_host(self.weights)

    def save(self, path: str) -> None:
        with self.active():
            self.engine.save_weights(path)

    def load(self, path: str) -> None:
        with self.active():
            self.engine.load(path, with_optimizer=False)
            self.engine.copy_weights_to_host(self.weights)
