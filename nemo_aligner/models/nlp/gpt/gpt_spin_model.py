"""GPTSPINModel: self-play fine-tuning (Chen et al. 2024, arXiv 2401.01335).

For each SFT prompt the reference policy generates a response; the ground-truth response is
"actual" (preferred) and the generation is "generated". The loss is the DPO loss of the pair,
-log sigma(beta (R_actual - R_generated)) with R = sum_t m_t (log pi - log pi_ref) (eq. 4.7 with
the logistic loss), and the reference becomes the current policy after every iteration.
"""

from __future__ import annotations

import functools

import torch

from nemo_aligner.config.schema import PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.config.spin import SPINModelConfig
from nemo_aligner.engines.base import Batch
from nemo_aligner.losses.preference import dpo_loss, sequence_log_ratio
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.models.nlp.gpt.reward_metrics import finalize_reward_metrics, reward_moments
from nemo_aligner.utils.ref_policy import cpu_weight_swap, retrieve_model_state_dict_in_cpu


def spin_loss_fn(logprobs: torch.Tensor, batch: Batch, *, beta: float,
                 global_pairs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the SPIN loss; rows interleave actual (2i) and generated (2i+1).

    logprobs, batch["ref_logprobs"]: [2P, T-1]. An empty generation (EOS only) is a valid row.
    """
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    ratio = sequence_log_ratio(logprobs, batch["ref_logprobs"], mask, average=False)
    actual, generated = ratio[0::2], ratio[1::2]
    loss = dpo_loss(actual - generated, beta=beta, gt_margin=torch.zeros_like(actual)).sum() / global_pairs
    return loss, {
        "acc": (actual > generated).float().sum() / global_pairs,
        **reward_moments(beta * actual, beta * generated, global_pairs, first_name="actual", second_name="generated"),
    }


class GPTSPINModel(GPTModel):
    """SPIN policy; micro_batch_size and global_batch_size count prompts (pairs)."""

    def __init__(self, cfg: SPINModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        super().__init__(cfg, pretrained, trainer)
        self.spin = cfg.spin
        self.sampling = cfg.spin.sampling_params.build()
        self.length = cfg.spin.length_params.build()
        self.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(self)
        self.kl_penalty = 0.0
        self.set_KL_penalty_by_iteration(0)

    def set_KL_penalty_by_iteration(self, iteration: int) -> None:  # noqa: N802 (NeMo-Aligner's name)
        """beta for `iteration` (0-based): the scalar, or that entry of the per-iteration list."""
        betas = self.spin.ref_policy_kl_penalty
        if not isinstance(betas, (list, tuple)):
            self.kl_penalty = float(betas)
        elif iteration < len(betas):
            self.kl_penalty = float(betas[iteration])
        else:
            raise IndexError(f"no model.spin.ref_policy_kl_penalty for iteration {iteration} (list of {len(betas)})")

    def update_reference_policy(self) -> None:
        """The reference becomes the current policy (end of an iteration)."""
        self.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(self)

    def generate_rejected(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The reference policy's response to each prompt (see GPTModel.generate_responses)."""
        with cpu_weight_swap(self, self.ref_policy_state_dict):
            return self.generate_responses(prompts, self.sampling, self.length,
                                           micro_batch_size=self.spin.rollout_micro_batch_size,
                                           offload_optimizer=self.spin.offload_adam_states)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        with cpu_weight_swap(self, self.ref_policy_state_dict):
            return self.get_logprobs(batch, 2 * self.cfg.micro_batch_size)

    def loss_and_metrics(self, pairs: Batch) -> dict[str, float]:
        """Forward/backward of the SPIN loss on interleaved actual/generated rows; reduced metrics."""
        pairs = {**pairs, "ref_logprobs": self.reference_logprobs(pairs)}
        global_pairs = self.global_sum(torch.tensor(pairs["input_ids"].shape[0] // 2, dtype=torch.float32))
        loss_fn = functools.partial(spin_loss_fn, beta=self.kl_penalty, global_pairs=global_pairs)
        sums = self.forward_backward(pairs, loss_fn, micro_batch_size=2 * self.cfg.micro_batch_size)
        return finalize_reward_metrics(sums)

    def sft_metrics(self, batch: Batch) -> dict[str, float]:
        """Validation: the token-mean NLL of the ground-truth responses (no generation)."""
        tokens = self.global_sum(batch["loss_mask"][:, 1:].sum())
        sums = self.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=tokens), forward_only=True)
        return {name: value.item() for name, value in sums.items()}
