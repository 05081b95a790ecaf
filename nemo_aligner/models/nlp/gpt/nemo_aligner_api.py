"""NeMo-Aligner's method names on our models, as mixins of thin adapters (no second implementation).

The classes at NeMo-Aligner's module paths (megatron_gpt_dpo_model.py, megatron_gpt_spin_model.py,
megatron_gpt_rs_actor.py) combine these with our models; docs/migrating_from_nemo_aligner.md maps
every name.
"""

from __future__ import annotations

import torch

from nemo_aligner.engines.base import Engine
from nemo_aligner.reference import ReferencePolicy, WeightCopyReference
from nemo_aligner.types import Batch


class AdamOffloadMethods:
    """offload_adam_states / onload_adam_states: the optimizer state to host memory and back."""

    engine: Engine

    def offload_adam_states(self) -> None:
        self.engine.offload_optimizer_state()

    def onload_adam_states(self) -> None:
        self.engine.onload_optimizer_state()


class PairLossMethods:
    """get_loss_and_metrics(batch, forward_only) -> (loss, metrics) of a pair batch (DPO and SPIN)."""

    def get_loss_and_metrics(self, batch: Batch, forward_only: bool) -> tuple[float, dict[str, float]]:
        """(loss, metrics) of a pair batch, scored against the reference; gradients unless forward_only."""
        metrics = self.loss_and_metrics(batch, forward_only=forward_only)  # type: ignore[attr-defined]
        return metrics["loss"], metrics


class ReferencePolicyMethods:
    """ref_policy_state_dict (the reference's host weights) and get_ref_policy_logprobs."""

    reference: ReferencePolicy  # and the model's reference_logprobs(batch)

    @property
    def ref_policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The reference's weights: this rank's local pieces, by name (host memory for swap, the device
        in the compute dtype for resident)."""
        return self._host_copy_reference().weights

    @ref_policy_state_dict.setter
    def ref_policy_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        self._host_copy_reference().set_weights(weights)

    def get_ref_policy_logprobs(self, batch: Batch) -> torch.Tensor:
        """Per-token log-probs [2B, T-1] of a pair batch under the reference."""
        return self.reference_logprobs(batch)  # type: ignore[attr-defined]

    def _host_copy_reference(self) -> WeightCopyReference:
        if not isinstance(self.reference, WeightCopyReference):
            raise AttributeError(f"ref_policy_state_dict is the weights of a swap or resident reference; this model's "
                                 f"reference is {self.reference.name}")
        return self.reference
