"""GPTSPINModel: self-play fine-tuning (Chen et al. 2024, arXiv 2401.01335).

For each SFT prompt the reference policy generates a response; the ground-truth response is
"actual" (the chosen side of a pair) and the generation "generated" (the rejected side). The loss
is nemo_aligner/losses/spin.py's, and the reference becomes the current policy after every iteration.
"""

from __future__ import annotations

import functools

import torch

from nemo_aligner.config.schema import PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.config.spin import SPINModelConfig
from nemo_aligner.data.collate import pair_collate
from nemo_aligner.losses.reward_metrics import finalize_reward_metrics
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.losses.spin import spin_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.reference import ReferencePolicy, build_reference_policy
from nemo_aligner.types import ROWS_PER_PAIR, Batch


class GPTSPINModel(GPTModel):
    """SPIN policy; micro_batch_size and global_batch_size count prompts (pairs)."""

    rows_per_example = ROWS_PER_PAIR
    config_class = SPINModelConfig

    def __init__(self, cfg: SPINModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        super().__init__(cfg, pretrained, trainer)
        self.spin = cfg.spin
        self.pad_to_multiple_of = cfg.data.pad_to_multiple_of
        self.reference: ReferencePolicy = build_reference_policy(cfg.spin.reference.strategy, self.engine,
                                                                 precomputable=False)
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
        self.reference.become_current_policy()

    def generate_rejected(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The reference policy's response to each prompt (see GPTModel.generate_responses)."""
        with self.reference.active():
            return self.generate_responses(prompts, self.spin.sampling_params, self.spin.length_params,
                                           micro_batch_size=self.spin.rollout_micro_batch_size,
                                           memory_fraction=self.spin.rollout_memory_fraction,
                                           offload_optimizer=self.spin.offload_adam_states)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """Per-token log-probs [2P, T-1] of a pair batch under the reference."""
        return self.reference.logprobs(self.micro_batches(batch))

    def pair_batch(self, prompts: list[torch.Tensor], actual: list[torch.Tensor],
                   generated: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pair-layout batch of each prompt with its ground-truth (chosen) and generated (rejected) response."""
        return pair_collate(
            [{"prompt_ids": p, "chosen_ids": a, "rejected_ids": g, "chosen_reward": 1.0, "rejected_reward": 0.0}
             for p, a, g in zip(prompts, actual, generated)],
            pad_token_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def loss_and_metrics(self, pairs: Batch, *, forward_only: bool = False) -> dict[str, float]:
        """Forward(/backward) of the SPIN loss on a pair batch; reduced metrics."""
        pairs = self.on_device(pairs)
        pairs["ref_logps"] = self.reference.sequence_logps(pairs, self.micro_batches)
        loss_fn = functools.partial(spin_loss_fn, beta=self.kl_penalty, global_pairs=self.global_examples(pairs))
        return finalize_reward_metrics(self.forward_backward(pairs, loss_fn, forward_only=forward_only))

    def sft_metrics(self, batch: Batch, *, forward_only: bool = True) -> dict[str, float]:
        """Validation: the token-mean NLL of the ground-truth responses (no generation); an example
        of this SFT batch is one row (a prompt and its response), not a pair."""
        tokens = self.global_sum(batch["loss_mask"][:, 1:].sum())
        sums = self.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=tokens),
                                     forward_only=forward_only, rows_per_example=1)
        return {name: value.item() for name, value in sums.items()}
