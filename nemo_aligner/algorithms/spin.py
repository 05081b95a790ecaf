"""SPINTrainer: self-play fine-tuning with a reference update at the end of every iteration."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from nemo_aligner.algorithms.loop import BaseTrainer
from nemo_aligner.config.spin import SPINLoopConfig
from nemo_aligner.data.collate import dpo_custom_collate
from nemo_aligner.data.loader import Batch
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.utils.checkpoint import ShardedSaveable
from nemo_aligner.utils.distributed import log_rank0
from nemo_aligner.utils.ref_policy import cpu_weight_swap, retrieve_model_state_dict_in_cpu

logger = logging.getLogger(__name__)


class ReferenceWeights:
    """SPIN's reference as a sharded checkpoint entry, written and read through the live model
    (swapped in), so it reshards across layouts like the policy's own weights."""

    def __init__(self, policy: GPTSPINModel) -> None:
        self.policy = policy

    def save(self, path: str) -> None:
        with cpu_weight_swap(self.policy, self.policy.ref_policy_state_dict):
            self.policy.save_weights(path)

    def load(self, path: str) -> None:
        with cpu_weight_swap(self.policy, self.policy.ref_policy_state_dict):
            self.policy.load(path, with_optimizer=False)
            self.policy.ref_policy_state_dict = retrieve_model_state_dict_in_cpu(self.policy)


class SPINTrainer(BaseTrainer):
    """max_iterations x max_epochs over the SFT data; each step generates the rejected responses
    with the reference, then takes one optimizer step on the SPIN loss."""

    algorithm = "spin"
    policy: GPTSPINModel
    loop: SPINLoopConfig

    def __init__(self, *, iteration_callback: Callable[[int, GPTSPINModel], Any] | None = None, pad_to_multiple_of: int,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_per_iteration = self.loop.max_epochs * self.train_data.sampler.batches_per_epoch
        total = self.loop.max_iterations * self.steps_per_iteration
        self.max_steps = total if self.loop.max_steps == -1 else min(self.loop.max_steps, total)
        self.iteration_callback = iteration_callback
        self.collate_pairs = functools.partial(dpo_custom_collate, pad_token_id=self.policy.tokenizer.pad_token_id,
                                               pad_to_multiple_of=pad_to_multiple_of)

    @property
    def iteration(self) -> int:
        """The iteration the next step belongs to (0-based)."""
        return self.state.step // self.steps_per_iteration

    def sharded_statefuls(self) -> dict[str, ShardedSaveable]:
        return {"reference": ReferenceWeights(self.policy)}

    def before_train_step(self) -> None:
        self.policy.set_KL_penalty_by_iteration(self.iteration)

    def after_train_step(self) -> None:
        if self.state.step % self.steps_per_iteration == 0:
            finished = self.state.step // self.steps_per_iteration - 1
            self.policy.update_reference_policy()
            log_rank0(logger, "spin iteration %d finished at step %d: the reference is now the current policy",
                      finished, self.state.step)
            if self.iteration_callback is not None:
                self.iteration_callback(finished, self.policy)

    def train_step(self, batch: Batch) -> dict[str, float]:
        prompts, actual = split_prompts_and_responses(batch)
        generated = self.policy.generate_rejected(prompts)
        pairs = self.collate_pairs([
            {"prompt_ids": p, "chosen_ids": a, "rejected_ids": g, "chosen_reward": 1.0, "rejected_reward": 0.0}
            for p, a, g in zip(prompts, actual, generated)
        ])
        metrics = self.policy.loss_and_metrics(pairs)
        grad_norm, lr = self.policy.optimizer_step(self.loop.gradient_clip_val)
        lengths = torch.tensor([float(len(g)) for g in generated])
        mean_length = (self.policy.global_sum(lengths.sum()) / self.policy.global_sum(torch.tensor(float(len(generated))))).item()
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "kl_penalty": self.policy.kl_penalty,
                "generated_length_mean": mean_length, "iteration": float(self.iteration)}

    def validation_step(self, batch: Batch) -> dict[str, float]:
        return self.policy.sft_metrics(batch)


def split_prompts_and_responses(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows of an SFT batch (right-padded prompt + response, loss_mask on the response) back into
    per-example prompt and response token ids."""
    prompts, responses = [], []
    for ids, mask, attention in zip(batch["input_ids"], batch["loss_mask"], batch["attention_mask"]):
        start, end = int(mask.argmax()), int(attention.sum())
        prompts.append(ids[:start])
        responses.append(ids[start:end])
    return prompts, responses
