"""No reference at all: the policy of a reference-free loss (SimPO, ORPO, CPO) is trained on its own
log-probs, so no copy of the weights is held, nothing is swapped in and nothing is precomputed. Every
method that would compute under a reference refuses, so a code path that reached for one fails loudly."""

from __future__ import annotations

from typing import Callable, ContextManager, NoReturn, Sequence

import torch

from nemo_aligner.types import Batch


class NoReference:
    """ReferencePolicy of reference-free losses (see the module docstring)."""

    name = "none (reference-free loss)"

    def _refuse(self) -> NoReturn:
        raise RuntimeError("the preference loss is reference-free: no reference policy exists to compute with")

    def sequence_logps(self, batch: Batch, split: Callable[[Batch], Sequence[Batch]]) -> torch.Tensor:
        self._refuse()

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        self._refuse()

    def active(self) -> ContextManager[None]:
        self._refuse()

    def become_current_policy(self) -> None:
        self._refuse()

    def save(self, path: str) -> None:
        """Nothing to write."""

    def load(self, path: str) -> None:
        """Nothing to read."""
