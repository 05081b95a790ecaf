"""The SPIN objective of one micro-batch (Chen et al. 2024, arXiv 2401.01335).

Pair-layout rows: the ground-truth ("actual") response is the chosen side, the reference's own
generation the rejected side. The loss is −log σ(β (R_actual − R_generated)) with
R = Σ_t m_t (log π − log π_ref) (eq. 4.7 with the logistic loss).
"""

from __future__ import annotations

import torch

from nemo_aligner.losses.preference import dpo_loss, preference_pairs
from nemo_aligner.losses.reward_metrics import reward_moments
from nemo_aligner.types import ROWS_PER_PAIR, Batch


def spin_loss_fn(logprobs: torch.Tensor, batch: Batch, *, beta: float,
                 global_pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the SPIN loss and its metric sums.

    logprobs: [2P, T-1]; batch["loss_mask"]: [2P, T]; batch["ref_logps"]: [2P] the reference's Σ_t
    log-probs per row. An empty generation (EOS only) is a valid row. Values are sums over the pairs
    divided by `global_pairs`.
    """
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    pairs = preference_pairs(logprobs, mask, ref_logps=batch["ref_logps"], average_log_probs=False,
                             gt_margin=torch.zeros(mask.shape[0] // ROWS_PER_PAIR, dtype=logprobs.dtype, device=logprobs.device))
    actual, generated = pairs.chosen_logratios, pairs.rejected_logratios
    loss = dpo_loss(pairs, beta=beta).sum() / global_pairs
    return loss, {
        "acc": (actual > generated).float().sum() / global_pairs,
        **reward_moments(beta * actual, beta * generated, global_pairs, first_name="actual", second_name="generated"),
    }
