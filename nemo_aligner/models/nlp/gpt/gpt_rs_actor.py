"""GPTRSActor: the policy of rejection-sampling fine-tuning.

It generates several rollouts per prompt and gives the loss of a batch of kept sequences (the
negative masked-mean log-prob); which rollouts are kept and when the optimizer steps is the
trainer's (nemo_aligner/algorithms/rs.py).
"""

from __future__ import annotations

import functools

import torch

from nemo_aligner.config.rs import RSModelConfig
from nemo_aligner.config.schema import PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.data.collate import sft_collate
from nemo_aligner.losses.sft import sequence_mean_nll_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel


class GPTRSActor(GPTModel):
    """Rejection-sampling actor; micro/global batch sizes count kept sequences."""

    config_class = RSModelConfig

    def __init__(self, cfg: RSModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        super().__init__(cfg, pretrained, trainer)
        self.rs = cfg.rs
        self.pad_to_multiple_of = cfg.data.pad_to_multiple_of

    def generate_rollouts(self, prompts: list[torch.Tensor], rollouts_per_prompt: int) -> list[torch.Tensor]:
        """Responses; rollout j of prompt i is at i * rollouts_per_prompt + j (see generate_responses)."""
        expanded = [p for p in prompts for _ in range(rollouts_per_prompt)]
        return self.generate_responses(expanded, self.rs.sampling_params, self.rs.length_params,
                                       micro_batch_size=self.rs.rollout_micro_batch_size,
                                       memory_fraction=self.rs.rollout_memory_fraction,
                                       offload_optimizer=self.rs.offload_adam_states)

    def sequence_batch(self, sequences: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """(prompt ids, response ids) pairs as right-padded training rows, loss on the responses."""
        return sft_collate([{"prompt_ids": p, "response_ids": r} for p, r in sequences],
                           pad_token_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def loss_and_metrics(self, batch: dict[str, torch.Tensor], *, forward_only: bool = False) -> dict[str, float]:
        """Forward(/backward) of the mean over all ranks' sequences of each one's token-mean NLL;
        returns the reduced `loss` and `num_tokens`."""
        sums = self.forward_backward(batch, functools.partial(sequence_mean_nll_loss_fn,
                                                              global_sequences=self.global_examples(batch)),
                                     forward_only=forward_only)
        return {name: value.item() for name, value in sums.items()}
