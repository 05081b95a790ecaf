"""GPTRSActor: the policy of rejection-sampling fine-tuning.

It generates several rollouts per prompt, and fine-tunes on the best ones (chosen by the
trainer) with the negative masked-mean log-prob, in chunks of global_batch_size sequences.
"""

from __future__ import annotations

import functools

import torch

from nemo_aligner.config.rs import RSModelConfig
from nemo_aligner.config.schema import PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.data.collate import sft_collate
from nemo_aligner.engines.base import Batch
from nemo_aligner.losses.preference import sequence_nll
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel


def select_top_n(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [P, n] of the n best rollouts of each prompt row in rewards [P, K] (ties: lower
    index first). Selection is per example row, so duplicate prompts are handled independently."""
    return torch.sort(rewards, dim=1, descending=True, stable=True).indices[:, :n]


def rs_sft_loss_fn(logprobs: torch.Tensor, batch: Batch, *,
                   global_sequences: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over the global chunk's sequences of each sequence's masked-mean NLL."""
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    return sequence_nll(logprobs, mask, average=True).sum() / global_sequences, {}


class GPTRSActor(GPTModel):
    """Rejection-sampling actor; micro/global batch sizes count kept sequences."""

    def __init__(self, cfg: RSModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        super().__init__(cfg, pretrained, trainer)
        self.rs = cfg.rs
        self.sampling = cfg.rs.sampling_params.build()
        self.length = cfg.rs.length_params.build()
        self.pad_to_multiple_of = cfg.data.pad_to_multiple_of

    def generate_rollouts(self, prompts: list[torch.Tensor], rollouts_per_prompt: int) -> list[torch.Tensor]:
        """Responses; rollout j of prompt i is at i * rollouts_per_prompt + j (see generate_responses)."""
        expanded = [p for p in prompts for _ in range(rollouts_per_prompt)]
        return self.generate_responses(expanded, self.sampling, self.length,
                                       micro_batch_size=self.rs.rollout_micro_batch_size,
                                       offload_optimizer=self.rs.offload_adam_states)

    def sft_update(self, sequences: list[tuple[torch.Tensor, torch.Tensor]], max_grad_norm: float) -> list[dict[str, float]]:
        """One optimizer step per global_batch_size kept sequences; returns each step's metrics."""
        local = self.local_batch_size
        steps = []
        for start in range(0, len(sequences), local):
            chunk = [{"prompt_ids": p, "response_ids": r} for p, r in sequences[start : start + local]]
            batch = sft_collate(chunk, pad_token_id=self.tokenizer.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
            global_sequences = self.global_sum(torch.tensor(float(len(chunk))))
            sums = self.forward_backward(batch, functools.partial(rs_sft_loss_fn, global_sequences=global_sequences))
            grad_norm, lr = self.optimizer_step(max_grad_norm)
            steps.append({"loss": sums["loss"].item(), "num_tokens": sums["num_tokens"].item(), "grad_norm": grad_norm, "lr": lr})
        return steps
