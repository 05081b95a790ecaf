"""The DPO objective of one micro-batch: a preference loss plus an SFT term on the chosen responses."""

from __future__ import annotations

from typing import Mapping

import torch

from nemo_aligner.losses.preference import (PreferencePairs, PreferenceTerm, combined_preference_loss, pairs_from_row_sums,
                                            preference_pairs)
from nemo_aligner.losses.reward_metrics import finalize_reward_metrics, reward_moments
from nemo_aligner.losses.sequence import sequence_nll
from nemo_aligner.types import Batch, chosen_rows, rejected_rows


def dpo_loss_fn(logprobs: torch.Tensor, batch: Batch, *, preference_terms: list[PreferenceTerm], beta: float,
                preference_weight: float, sft_weight: float, average_log_probs: bool, sft_average_log_probs: bool,
                gt_reward_scale: float, global_pairs: torch.Tensor, loss_state: Mapping[str, float] | None = None,
                step_pairs: PreferencePairs | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of preference_weight · L_pref + sft_weight · L_sft, L_pref = Σ_i w_i · loss_i.

    Args:
        logprobs: [2P, T-1] policy log-probs of pair-layout rows.
        batch: loss_mask [2P, T], rewards [2P], and ref_logps [2P] (the reference's Σ_t log-probs per
            row) unless every loss is reference-free.
        preference_terms: the registered losses with their weights and hyper-parameters (build_preference_terms).
        loss_state: the values of the losses' state parameters for this step (e.g. BCO's reward mean).
        beta: β, the KL coefficient; rewards are reported as β·R (the implicit DPO reward).
        preference_weight, sft_weight: the two terms' weights.
        average_log_probs: R as a per-token mean instead of a sum.
        sft_average_log_probs: the SFT NLL as a per-token mean instead of a sum.
        gt_reward_scale: scales the data's reward margin (the rpo_* losses' target).
        global_pairs: pairs in the global batch; every value is a sum over this micro-batch's pairs
            divided by it, so sums over micro-batches and ranks are global means.
        step_pairs: for step-level losses, every pair of the step (dpo_step_pairs); the batch's
            `pair_index` rows then give each pair's index in it.
    """
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    step_index = None if step_pairs is None else chosen_rows(batch["pair_index"])
    pairs = preference_pairs(logprobs, mask, ref_logps=batch.get("ref_logps"), average_log_probs=average_log_probs,
                             gt_margin=_gt_margin(batch, gt_reward_scale, logprobs.dtype), step=step_pairs,
                             step_index=step_index)
    preference, own = combined_preference_loss(pairs, preference_terms, beta=beta, state=loss_state or {})
    sft = sequence_nll(chosen_rows(logprobs), chosen_rows(mask), average=sft_average_log_probs)
    loss = (preference_weight * preference + sft_weight * sft).sum() / global_pairs
    metrics = {
        "preference_loss": preference.sum() / global_pairs,
        "sft_loss": sft.sum() / global_pairs,
        "acc": (pairs.chosen_logratios > pairs.rejected_logratios).float().sum() / global_pairs,
        **reward_moments(beta * pairs.chosen_logratios, beta * pairs.rejected_logratios, global_pairs,
                         first_name="chosen", second_name="rejected"),
        **{name: value.sum() / global_pairs for name, value in own.items()},
    }
    return loss, metrics


def dpo_step_pairs(row_logps: torch.Tensor, batch: Batch, *, average_log_probs: bool,
                   gt_reward_scale: float) -> PreferencePairs:
    """The pairs of `batch` as dpo_loss_fn sees them, from each row's Σ_t log-probs [2P] (no gradients)."""
    lengths = batch["loss_mask"][:, 1:].sum(dim=-1).to(row_logps)
    ref_logps = batch["ref_logps"].to(row_logps.device) if "ref_logps" in batch else None
    return pairs_from_row_sums(row_logps, lengths, ref_logps=ref_logps, average_log_probs=average_log_probs,
                               gt_margin=_gt_margin(batch, gt_reward_scale, row_logps.dtype).to(row_logps.device))


def _gt_margin(batch: Batch, gt_reward_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """g = gt_reward_scale · (r_chosen − r_rejected) per pair, the rpo_* losses' target."""
    rewards = batch["rewards"]
    return gt_reward_scale * (chosen_rows(rewards) - rejected_rows(rewards)).to(dtype)


def finalize_dpo_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Globally reduced sums -> reported floats (adds the reward margin and std)."""
    return finalize_reward_metrics(sums, margin_of=("chosen", "rejected"))
