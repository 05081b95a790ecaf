"""DPOTrainer: preference optimisation (DPO, IPO, RPO) on the shared fit loop."""

from __future__ import annotations

from nemo_aligner.algorithms.loop import BaseTrainer
from nemo_aligner.data.collate import dpo_custom_collate
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.types import Batch

__all__ = ["DPOTrainer", "dpo_custom_collate"]


class DPOTrainer(BaseTrainer):
    """Each step: reference log-probs, the preference loss over micro-batches of whole pairs, one
    optimizer step clipped by the global gradient norm."""

    algorithm = "dpo"
    policy: GPTDPOModel

    def train_step(self, batch: Batch) -> dict[str, float]:
        metrics = self.policy.loss_and_metrics(batch, forward_only=False)
        grad_norm, lr = self.policy.optimizer_step(self.loop.gradient_clip_val)
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    def validation_step(self, batch: Batch) -> dict[str, float]:
        return self.policy.loss_and_metrics(batch, forward_only=True)
