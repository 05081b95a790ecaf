"""GPTDPOModel: the policy trained with a preference loss against a frozen reference.

Batches hold preference pairs as interleaved rows (row 2i chosen, row 2i+1 rejected; see
nemo_aligner/data/collate.py), so micro-batches of 2 x micro_batch_size rows keep pairs whole.
The reference is the initial model, kept as a CPU copy and swapped in to score each batch.
"""

from __future__ import annotations

import functools

import torch

from nemo_aligner.config.dpo import DPOLossConfig, DPOModelConfig
from nemo_aligner.config.schema import PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.engines.base import Batch
from nemo_aligner.losses.preference import get_preference_loss, sequence_log_ratio, sequence_nll
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.models.nlp.gpt.reward_metrics import finalize_reward_metrics, reward_moments
from nemo_aligner.utils.ref_policy import cpu_weight_swap, retrieve_model_state_dict_in_cpu


def dpo_loss_fn(logprobs: torch.Tensor, batch: Batch, *, cfg: DPOLossConfig,
                global_pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of preference_loss_weight * L_pref + sft_loss_weight * L_sft.

    logprobs: [2P, T-1] policy log-probs; batch["ref_logprobs"]: [2P, T-1]; batch["rewards"]: [2P].
    Every value is a sum over the micro-batch's pairs divided by the global pair count, so sums
    over micro-batches and ranks are global means. Rewards are reported as beta * R (the
    implicit DPO reward).
    """
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    ratio = sequence_log_ratio(logprobs, batch["ref_logprobs"], mask, average=cfg.preference_average_log_probs)
    chosen, rejected = ratio[0::2], ratio[1::2]
    gt_margin = cfg.gt_reward_scale * (batch["rewards"][0::2] - batch["rewards"][1::2]).to(ratio.dtype)
    preference = get_preference_loss(cfg.preference_loss)(chosen - rejected, beta=cfg.ref_policy_kl_penalty,
                                                          gt_margin=gt_margin)
    sft = sequence_nll(logprobs[0::2], mask[0::2], average=cfg.sft_average_log_probs)
    loss = (cfg.preference_loss_weight * preference + cfg.sft_loss_weight * sft).sum() / global_pairs
    metrics = {
        "preference_loss": preference.sum() / global_pairs,
        "sft_loss": sft.sum() / global_pairs,
        "acc": (chosen > rejected).float().sum() / global_pairs,
        **reward_moments(cfg.ref_policy_kl_penalty * chosen, cfg.ref_policy_kl_penalty * rejected, global_pairs,
                         first_name="chosen", second_name="rejected"),
    }
    return loss, metrics


def finalize_dpo_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Globally reduced sums -> reported floats (adds the reward margin and std)."""
    return finalize_reward_metrics(sums, margin_of=("chosen", "rejected"))


class GPTDPOModel(GPTModel):
    """DPO / IPO / RPO policy. micro_batch_size and global_batch_size count pairs."""

    def __init__(self, cfg: DPOModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        super().__init__(cfg, pretrained, trainer)
        self.dpo = cfg.dpo
        self.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(self)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Log-probs [2P, T-1] under the reference (initial) weights."""
        with cpu_weight_swap(self, self.ref_policy_state_dict):
            return self.get_logprobs(batch, 2 * self.dpo.log_prob_forward_micro_batch_size)

    def loss_and_metrics(self, batch: Batch, *, forward_only: bool) -> dict[str, float]:
        """Score the batch against the reference, run forward(/backward), return reduced metrics."""
        batch = {**batch, "ref_logprobs": self.reference_logprobs(batch)}
        pairs = self.global_sum(torch.tensor(batch["input_ids"].shape[0] // 2, dtype=torch.float32))
        loss_fn = functools.partial(dpo_loss_fn, cfg=self.dpo, global_pairs=pairs)
        sums = self.forward_backward(batch, loss_fn, forward_only=forward_only,
                                     micro_batch_size=2 * self.cfg.micro_batch_size)
        return finalize_dpo_metrics(sums)
