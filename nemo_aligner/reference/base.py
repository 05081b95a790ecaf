"""What the models need from a reference policy, whichever way it is held.

A strategy is one class with these methods: the host copy swapped into the network (host_copy.py),
and later a device-resident copy, log-probs precomputed once, or the same network with its adapters
disabled. DPO's reference is the initial model, also after a resume; SPIN's becomes the current
policy at the end of every iteration and is saved with each checkpoint.
"""

from __future__ import annotations

from typing import ContextManager, Protocol, Sequence

import torch

from nemo_aligner.types import Batch


class ReferencePolicy(Protocol):
    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Per-token log-probs [rows, T-1] of the micro-batches under the reference, concatenated."""
        ...

    def active(self) -> ContextManager[None]:
        """Inside the block the policy network computes as the reference (SPIN generates with it);
        on exit, also on error, the training weights are back exactly."""
        ...

    def become_current_policy(self) -> None:
        """The reference becomes the policy's current weights (SPIN, end of an iteration)."""
        ...

    def save(self, path: str) -> None:
        """Collectively write the reference (a checkpoint entry), loadable into any layout."""
        ...

    def load(self, path: str) -> None:
        """Collectively read what save wrote."""
        ...
