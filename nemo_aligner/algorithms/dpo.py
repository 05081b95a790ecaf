"""DPOTrainer: preference optimisation (DPO, IPO, RPO) on the shared fit loop, and NeMo-Aligner's
`dpo_custom_collate` (this module path and both names are NeMo-Aligner's)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from nemo_aligner.algorithms.loop import BaseTrainer
from nemo_aligner.reference import PrecomputedReference
from nemo_aligner.config.dpo import DPOLoopConfig
from nemo_aligner.data.collate import pair_collate
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.types import Batch

__all__ = ["DPOTrainer", "dpo_custom_collate"]

REFERENCE_CACHE = "reference_logps"  # under the log directory, unless model.dpo.reference.cache_dir says where


def dpo_custom_collate(batch: Sequence[Mapping[str, Any]], eos_id: int, reset_position_ids: bool = False,
                       reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                       pad_length_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """NeMo-Aligner's collate, over nemo_aligner.data.collate.pair_collate: preference pairs (items of
    PreferenceDataset) padded with `eos_id`, as NeMo-Aligner pads, into the pair layout.

    NeMo-Aligner's packed-sequence switches (reset_position_ids, reset_attention_mask,
    eod_mask_loss) must stay False; pad_length_to_multiple_of rounds this rank's length up (ranks
    need not agree on a length here, so there is no all-reduce of the longest row).
    """
    for name, value in (("reset_position_ids", reset_position_ids), ("reset_attention_mask", reset_attention_mask),
                        ("eod_mask_loss", eod_mask_loss)):
        if value:
            raise ValueError(f"dpo_custom_collate({name}=True) is not supported: rows hold one sequence each")
    if pad_length_to_multiple_of is not None and pad_length_to_multiple_of < 0:
        raise ValueError(f"pad_length_to_multiple_of={pad_length_to_multiple_of} must be >= 0")
    return pair_collate(batch, pad_token_id=eos_id, pad_to_multiple_of=pad_length_to_multiple_of or 1)


class DPOTrainer(BaseTrainer):
    """Each step: reference log-probs, the preference loss over micro-batches of whole pairs, one
    optimizer step clipped by the global gradient norm."""

    algorithm = "dpo"
    model: GPTDPOModel
    cfg: DPOLoopConfig
    loop_config = DPOLoopConfig

    def before_fit(self) -> None:
        """With a precomputed reference: the reference log-probs of the training and validation pairs, from
        their cache or one pass with the initial weights (which the model still holds before a resume)."""
        reference = self.model.reference
        if not isinstance(reference, PrecomputedReference):
            return
        cache_dir = self.model.dpo.reference.cache_dir or os.path.join(self.log_dir, REFERENCE_CACHE)
        for name, loader in (("train", self.train_dataloader), ("validation", self.val_dataloader)):
            if loader is not None:
                reference.precompute_into(loader.dataset, name=name, cache_dir=cache_dir,
                                          pairs_per_forward=self.model.dpo.log_prob_forward_micro_batch_size,
                                          collate=loader.collate, score=self.model.sequence_logps)

    def train_step(self, batch: Batch) -> dict[str, float]:
        metrics = self.model.loss_and_metrics(batch, forward_only=False)
        grad_norm, lr = self.model.optimizer_step(self.cfg.gradient_clip_val)
        return {**metrics, "grad_norm": grad_norm, "lr": lr}

    def validation_step(self, batch: Batch) -> dict[str, float]:
        return self.model.loss_and_metrics(batch, forward_only=True)
