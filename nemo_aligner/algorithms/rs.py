"""RSTrainer: rejection-sampling fine-tuning on the shared fit loop.

Each step takes num_rollout_samples prompts, generates num_rollouts_per_prompt responses for
each, scores them, keeps the top_n_rollouts per prompt, and fine-tunes on the kept ones with one
optimizer step per global_batch_size kept sequences.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

import torch

from nemo_aligner.algorithms.loop import BaseTrainer
from nemo_aligner.config.rs import RSConfig, RSLoopConfig
from nemo_aligner.models.nlp.gpt.gpt_rs_actor import GPTRSActor
from nemo_aligner.servers.rewards import Reward, checked_rewards
from nemo_aligner.utils.distributed import is_rank0
from nemo_aligner.utils.log_dir import ROLLOUTS_FILE

KeptSequence = tuple[torch.Tensor, torch.Tensor]  # (prompt ids, response ids)


def select_top_n(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Indices [P, n] of the n best rollouts of each prompt row in rewards [P, K] (ties: lower
    index first). Selection is per example row, so duplicate prompts are handled independently."""
    return torch.sort(rewards, dim=1, descending=True, stable=True).indices[:, :n]


class RSTrainer(BaseTrainer):
    algorithm = "rs"
    model: GPTRSActor
    cfg: RSLoopConfig
    loop_config = RSLoopConfig

    def __init__(self, *, reward: Reward, rs: RSConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reward, self.rs = reward, rs
        self.updates_per_step = rs.num_rollout_samples * rs.top_n_rollouts // self.model.cfg.global_batch_size
        self.rollout_log = os.path.join(self.log_dir, ROLLOUTS_FILE)

    def optimizer_steps(self) -> int:
        return self.max_steps * self.updates_per_step

    def train_step(self, batch: list[dict[str, Any]]) -> dict[str, float]:
        k, n = self.rs.num_rollouts_per_prompt, self.rs.top_n_rollouts
        start = time.perf_counter()
        rollouts, rewards = self._rollouts(batch, k, what=f"rs step {self.state.step + 1}")
        generation_time = time.perf_counter() - start
        keep = select_top_n(rewards, n)
        kept = [(batch[i]["prompt_ids"], rollouts[i * k + j]) for i in range(len(batch)) for j in keep[i].tolist()]
        start = time.perf_counter()
        updates = self.fine_tune(kept)
        training_time = time.perf_counter() - start
        return {
            **self._reward_stats(rewards, "reward"), **self._reward_stats(rewards.gather(1, keep), "kept_reward"),
            "response_length_mean": self.model.global_mean(torch.tensor([float(len(r)) for r in rollouts])),
            "loss": sum(u["loss"] for u in updates) / len(updates),
            "grad_norm": updates[-1]["grad_norm"], "lr": updates[-1]["lr"],
            "num_tokens": sum(u["num_tokens"] for u in updates),
            "generation_time": generation_time, "training_time": training_time,
        }

    def fine_tune(self, kept: Sequence[KeptSequence]) -> list[dict[str, float]]:
        """One optimizer step per global_batch_size kept sequences (this rank's share of them at a
        time); returns each step's metrics."""
        local = self.model.local_batch_size
        updates = []
        for start in range(0, len(kept), local):
            metrics = self.model.loss_and_metrics(self.model.sequence_batch(list(kept[start : start + local])))
            grad_norm, lr = self.model.optimizer_step(self.cfg.gradient_clip_val)
            updates.append({**metrics, "grad_norm": grad_norm, "lr": lr})
        return updates

    def validation_step(self, batch: list[dict[str, Any]]) -> dict[str, float]:
        rollouts, rewards = self._rollouts(batch, 1, what=f"rs validation at step {self.state.step}")
        lengths = torch.tensor([float(len(r)) for r in rollouts])
        return {"reward_mean": self.model.global_mean(rewards.flatten()),
                "response_length_mean": self.model.global_mean(lengths),
                "num_tokens": self.model.global_sum(lengths.sum()).item()}

    def _rollouts(self, batch: list[dict[str, Any]], k: int, *, what: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """k generations per prompt and their rewards [P, k]; logs a few samples from rank 0."""
        rollouts = self.model.generate_rollouts([ex["prompt_ids"] for ex in batch], k)
        texts = [ex["prompt_text"] for ex in batch for _ in range(k)]
        responses = self.model.tokenizer.batch_decode(rollouts, skip_special_tokens=True)
        scores = checked_rewards(self.reward, texts, responses, batch=f"{what} ({len(responses)} responses)")
        if k > 1:
            self._log_samples(texts, responses, scores)
        return rollouts, torch.tensor(scores, dtype=torch.float32).view(len(batch), k)

    def _log_samples(self, prompts: Sequence[str], responses: Sequence[str], scores: Sequence[float]) -> None:
        if not is_rank0() or self.cfg.rollout_log_samples == 0:
            return
        with open(self.rollout_log, "a") as f:
            for p, r, s in list(zip(prompts, responses, scores))[: self.cfg.rollout_log_samples]:
                f.write(json.dumps({"step": self.state.step + 1, "prompt": p, "response": r, "reward": s}) + "\n")

    def _reward_stats(self, rewards: torch.Tensor, name: str) -> dict[str, float]:
        return {f"{name}_mean": self.model.global_mean(rewards.flatten()),
                f"{name}_max": self.model.global_max(rewards.max()).item(),
                f"{name}_min": -self.model.global_max(-rewards.min()).item()}
