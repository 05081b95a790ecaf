"""What the models need from a reference policy, whichever way it is held.

A strategy is one class with these methods: a copy of the weights swapped into the network, on the
host (swap) or the device (resident) (weight_copy.py), and log-probs computed once before training
and cached on disk (precomputed.py), and the same network with its LoRA adapters disabled
(adapters_disabled.py; under LoRA the weight copies hold only the adapters). DPO's
reference is the initial model, also after a resume; SPIN's becomes the current policy at the end of
every iteration and is saved with each checkpoint.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Protocol, Sequence

import torch

from nemo_aligner.engines.base import Engine
from nemo_aligner.types import Batch


class ReferencePolicy(Protocol):
    name: str  # the strategy, for the log

    def sequence_logps(self, batch: Batch, split: Callable[[Batch], Sequence[Batch]]) -> torch.Tensor:
        """Σ_t of the reference's log-probs over each row's scored positions (loss_mask), [rows].
        `split` cuts `batch` into the model's micro-batches on the device; only strategies that compute
        call it (precomputed values come with the batch, so no micro-batch is laid out for them)."""
        ...

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Per-token log-probs [rows, T-1] under the reference (strategies that hold weights)."""
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


class ComputedOnThePolicyNetwork:
    """The log-probs of a strategy that computes them with the policy network, inside its `active()`
    block (weight copies swapped in, or the adapters switched off)."""

    engine: Engine

    def active(self) -> ContextManager[None]:
        raise NotImplementedError

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        with self.active():
            return self.engine.logprobs(micro_batches)

    def sequence_logps(self, batch: Batch, split: Callable[[Batch], Sequence[Batch]]) -> torch.Tensor:
        micro_batches = split(batch)
        return sum_over_scored(self.logprobs(micro_batches), micro_batches)


def sum_over_scored(logprobs: torch.Tensor, micro_batches: Sequence[Batch]) -> torch.Tensor:
    """Σ_t logprobs [rows, T-1] over each row's loss_mask[:, 1:] positions -> [rows] (fp32)."""
    mask = torch.cat([mb["loss_mask"][:, 1:] for mb in micro_batches]).to(logprobs.dtype)
    return (logprobs * mask).sum(dim=-1)
