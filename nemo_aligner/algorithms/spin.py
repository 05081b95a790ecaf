"""SPINTrainer: self-play fine-tuning with a reference update at the end of every iteration."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from nemo_aligner.algorithms.loop import BaseTrainer
from nemo_aligner.config.spin import SPINLoopConfig
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.types import Batch
from nemo_aligner.utils.checkpoint import ShardedSaveable
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


class SPINTrainer(BaseTrainer):
    """max_iterations x max_epochs over the SFT data; each step generates the rejected responses
    with the reference, then takes one optimizer step on the SPIN loss.

    Training batches are this rank's SFT examples as the dataset gives them (a list of
    {prompt_ids, response_ids}); validation batches are collated SFT rows.
    """

    algorithm = "spin"
    model: GPTSPINModel
    cfg: SPINLoopConfig
    loop_config = SPINLoopConfig

    def __init__(self, *, iteration_callback: Callable[[int, GPTSPINModel], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_per_iteration = self.cfg.max_epochs * self.train_dataloader.sampler.batches_per_epoch
        total = self.cfg.max_iterations * self.steps_per_iteration
        self.max_steps = total if self.cfg.max_steps == -1 else min(self.cfg.max_steps, total)
        self.iteration_callback = iteration_callback

    @property
    def iteration(self) -> int:
        """The iteration the next step belongs to (0-based)."""
        return self.state.step // self.steps_per_iteration

    def sharded_statefuls(self) -> dict[str, ShardedSaveable]:
        return {"reference": self.model.reference}

    def before_train_step(self) -> None:
        self.model.set_KL_penalty_by_iteration(self.iteration)

    def after_train_step(self) -> None:
        if self.state.step % self.steps_per_iteration == 0:
            finished = self.state.step // self.steps_per_iteration - 1
            self.model.update_reference_policy()
            log_rank0(logger, "spin iteration %d finished at step %d: the reference is now the current policy",
                      finished, self.state.step)
            if self.iteration_callback is not None:
                self.iteration_callback(finished, self.model)

    def train_step(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        prompts, actual = [ex["prompt_ids"] for ex in batch], [ex["response_ids"] for ex in batch]
        start = time.perf_counter()
        generated = self.model.generate_rejected(prompts)
        generation_time = time.perf_counter() - start
        metrics = self.model.loss_and_metrics(self.model.pair_batch(prompts, actual, generated))
        grad_norm, lr = self.model.optimizer_step(self.cfg.gradient_clip_val)
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "kl_penalty": self.model.kl_penalty,
                "generated_length_mean": self.model.global_mean(torch.tensor([float(len(g)) for g in generated])),
                "iteration": float(self.iteration), "generation_time": generation_time}

    def validation_step(self, batch: Batch) -> dict[str, float]:
        return self.model.sft_metrics(batch)
