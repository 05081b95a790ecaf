"""RSTrainer: rejection-sampling fine-tuning on the shared fit loop.

Each step takes num_rollout_samples prompts, generates num_rollouts_per_prompt responses for
each, scores them, keeps the top_n_rollouts per prompt, and fine-tunes on the kept ones.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import torch

from nemo_aligner.algorithms.loop import BaseTrainer
from nemo_aligner.config.rs import RSConfig, RSLoopConfig
from nemo_aligner.models.nlp.gpt.gpt_rs_actor import GPTRSActor, select_top_n
from nemo_aligner.utils.distributed import is_rank0
from nemo_aligner.utils.rewards import Reward, checked_rewards


class RSTrainer(BaseTrainer):
    algorithm = "rs"
    policy: GPTRSActor
    loop: RSLoopConfig

    def __init__(self, *, reward: Reward, rs: RSConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reward, self.rs = reward, rs
        self.optimizer_steps_per_step = rs.num_rollout_samples * rs.top_n_rollouts // self.policy.cfg.global_batch_size
        self.rollout_log = os.path.join(self.log_dir, "rollouts.jsonl")

    def train_step(self, batch: list[dict[str, Any]]) -> dict[str, float]:
        k, n = self.rs.num_rollouts_per_prompt, self.rs.top_n_rollouts
        start = time.perf_counter()
        rollouts, rewards = self._rollouts(batch, k, what=f"rs step {self.state.step + 1}")
        generation_time = time.perf_counter() - start
        keep = select_top_n(rewards, n)
        kept = [(batch[i]["prompt_ids"], rollouts[i * k + j]) for i in range(len(batch)) for j in keep[i].tolist()]
        kept_rewards = rewards.gather(1, keep)
        start = time.perf_counter()
        updates = self.policy.sft_update(kept, self.loop.gradient_clip_val)
        training_time = time.perf_counter() - start
        lengths = torch.tensor([float(len(r)) for r in rollouts])
        return {
            **self._reward_stats(rewards, "reward"), **self._reward_stats(kept_rewards, "kept_reward"),
            "response_length_mean": self._mean(lengths),
            "loss": sum(u["loss"] for u in updates) / len(updates),
            "grad_norm": updates[-1]["grad_norm"], "lr": updates[-1]["lr"],
            "num_tokens": sum(u["num_tokens"] for u in updates),
            "generation_time": generation_time, "training_time": training_time,
        }

    def validation_step(self, batch: list[dict[str, Any]]) -> dict[str, float]:
        rollouts, rewards = self._rollouts(batch, 1, what=f"rs validation at step {self.state.step}")
        lengths = torch.tensor([float(len(r)) for r in rollouts])
        return {"reward_mean": self._mean(rewards.flatten()), "response_length_mean": self._mean(lengths),
                "num_tokens": self.policy.global_sum(lengths.sum()).item()}

    def _rollouts(self, batch: list[dict[str, Any]], k: int, *, what: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """k generations per prompt and their rewards [P, k]; logs a few samples from rank 0."""
        rollouts = self.policy.generate_rollouts([ex["prompt_ids"] for ex in batch], k)
        texts = [ex["prompt_text"] for ex in batch for _ in range(k)]
        responses = self.policy.tokenizer.batch_decode(rollouts, skip_special_tokens=True)
        scores = checked_rewards(self.reward, texts, responses, batch=f"{what} ({len(responses)} responses)")
        if k > 1:
            self._log_samples(texts, responses, scores)
        return rollouts, torch.tensor(scores, dtype=torch.float32).view(len(batch), k)

    def _log_samples(self, prompts: Sequence[str], responses: Sequence[str], scores: Sequence[float]) -> None:
        if not is_rank0() or self.loop.rollout_log_samples == 0:
            return
        with open(self.rollout_log, "a") as f:
            for p, r, s in list(zip(prompts, responses, scores))[: self.loop.rollout_log_samples]:
                f.write(json.dumps({"step": self.state.step + 1, "prompt": p, "response": r, "reward": s}) + "\n")

    def _mean(self, values: torch.Tensor) -> float:
        return (self.policy.global_sum(values.sum()) / self.policy.global_sum(torch.tensor(float(values.numel())))).item()

    def _reward_stats(self, rewards: torch.Tensor, name: str) -> dict[str, float]:
        return {f"{name}_mean": self._mean(rewards.flatten()),
                f"{name}_max": self.policy.global_max(rewards.max()).item(),
                f"{name}_min": -self.policy.global_max(-rewards.min()).item()}
