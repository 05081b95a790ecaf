"""NeMo-Aligner's MegatronGPTSPINModel: our GPTSPINModel with NeMo-Aligner's method names.

Batches are pair batches (GPTSPINModel.pair_batch: the ground-truth response as the chosen row,
the generation as the rejected one); the reference is kept by the model and scored internally.
"""

from __future__ import annotations

import torch

from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import AdamOffloadMethods, PairLossMethods, ReferencePolicyMethods
from nemo_aligner.reference import copy_of_weights
from nemo_aligner.types import Batch

REFERENCE_KEY = "reference_policy"


class MegatronGPTSPINModel(AdamOffloadMethods, PairLossMethods, ReferencePolicyMethods, GPTSPINModel):
    def get_loss_and_metrics_vanilla_sft(self, batch: Batch, forward_only: bool = True) -> tuple[float, dict[str, float]]:
        """(loss, metrics) of the token-mean NLL of an SFT batch's ground-truth responses."""
        metrics = self.sft_metrics(batch, forward_only=forward_only)
        return metrics["loss"], metrics

    def sharded_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's weight pieces as host copies: the policy's under "model", the reference's under
        "reference_policy" (layout-specific; the trainers' checkpoints are the layout-free ones)."""
        return {"model": copy_of_weights(self.engine, "host"),
                REFERENCE_KEY: {name: weight.to("cpu", copy=True) for name, weight in self.ref_policy_state_dict.items()}}

    def on_load_checkpoint(self, checkpoint: dict[str, dict[str, torch.Tensor]]) -> None:
        """Take the reference from a sharded_state_dict() (the policy's own weights are the loader's)."""
        if REFERENCE_KEY not in checkpoint:
            raise KeyError(f"the checkpoint holds no '{REFERENCE_KEY}' (keys: {sorted(checkpoint)})")
        self.ref_policy_state_dict = checkpoint[REFERENCE_KEY]
