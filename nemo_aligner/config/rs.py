"""Schema of examples/nlp/gpt/conf/gpt_rs_actor.yaml (NeMo-Aligner's key names)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from nemo_aligner.config.schema import (
    CheckpointCallbackParams,
    DataLoadingConfig,
    ExpManagerConfig,
    LoopConfig,
    ModelConfig,
    PretrainedCheckpointConfig,
    TrainerConfig,
    check_batch_layout,
    check_monitor,
)
from nemo_aligner.types import LengthParams, SamplingParams, require


# What RSTrainer's validation reports: one greedy-or-sampled rollout per prompt, scored.
RS_VALIDATION_METRICS = ("reward_mean", "response_length_mean")


@dataclass
class RSConfig:
    """model.rs: how many rollouts, which are kept, how they are generated."""

    num_rollout_samples: int = 32  # prompts per step, over all data-parallel ranks
    num_val_samples: int = 32  # prompts per validation batch
    num_rollouts_per_prompt: int = 4
    top_n_rollouts: int = 1  # best responses kept per prompt for the SFT update
    # sequences per generate call on one data-parallel rank; null: the most that fit in rollout_memory_fraction
    rollout_micro_batch_size: Optional[int] = 32
    rollout_memory_fraction: float = 0.5  # of the free device memory, for rollout_micro_batch_size null
    offload_adam_states: bool = True
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    length_params: LengthParams = field(default_factory=LengthParams)

    def __post_init__(self) -> None:
        for key in ("num_rollout_samples", "num_val_samples", "num_rollouts_per_prompt"):
            require(getattr(self, key) >= 1, f"model.rs.{key}", getattr(self, key), ">= 1")
        require(self.rollout_micro_batch_size is None or self.rollout_micro_batch_size >= 1,
                "model.rs.rollout_micro_batch_size", self.rollout_micro_batch_size, "null or >= 1")
        require(0 < self.rollout_memory_fraction <= 1, "model.rs.rollout_memory_fraction", self.rollout_memory_fraction,
                "in (0, 1]")
        require(1 <= self.top_n_rollouts <= self.num_rollouts_per_prompt, "model.rs.top_n_rollouts", self.top_n_rollouts,
                 f"in [1, num_rollouts_per_prompt={self.num_rollouts_per_prompt}]")


@dataclass
class PromptFiles:
    train: str = "examples/tiny/data/prompts_train.jsonl"
    validation: str = "examples/tiny/data/prompts_val.jsonl"


@dataclass
class PromptDataConfig(DataLoadingConfig):
    """model.data: prompt JSONL files (text or chat messages)."""

    data_prefix: PromptFiles = field(default_factory=PromptFiles)


@dataclass
class RSModelConfig(ModelConfig):
    """model: the actor; micro_batch_size / global_batch_size count kept sequences in the SFT update."""

    rs: RSConfig = field(default_factory=RSConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        kept = self.rs.num_rollout_samples * self.rs.top_n_rollouts
        if kept % self.global_batch_size:
            raise ValueError(f"model.rs.num_rollout_samples x model.rs.top_n_rollouts = {kept} kept sequences per step "
                             f"must be a multiple of model.global_batch_size={self.global_batch_size}")


class RewardSource(enum.Enum):
    function = "function"  # a Python reward function, in process
    remote = "remote"  # a reward server (examples/nlp/gpt/serve_reward_model.py) at remote_rm.reward_model


@dataclass
class RewardConfig:
    """reward: where scores come from. `source: remote` switches to the server in remote_rm."""

    source: RewardSource = RewardSource.function
    function: Optional[dict[str, Any]] = field(
        default_factory=lambda: {"_target_": "examples.tiny.task.exact_match_reward", "_partial_": True})


@dataclass
class RemoteEndpoint:
    ip: str = "localhost"
    port: int = 5555


@dataclass
class RemoteRMConfig:
    """remote_rm: the reward server (NeMo-Aligner's remote_rm.reward_model.ip / .port)."""

    reward_model: RemoteEndpoint = field(default_factory=RemoteEndpoint)
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0  # doubled after every failed attempt
    auth_token: Optional[str] = None


@dataclass
class RSLoopConfig(LoopConfig):
    section: ClassVar[str] = "trainer.rs"
    rollout_log_samples: int = 4  # rollouts (prompt, response, reward) written to rollouts.jsonl per step

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rollout_log_samples >= 0, "trainer.rs.rollout_log_samples", self.rollout_log_samples, ">= 0")


@dataclass
class RSTrainerConfig(TrainerConfig):
    rs: RSLoopConfig = field(default_factory=RSLoopConfig)


@dataclass
class RSJobConfig:
    trainer: RSTrainerConfig = field(default_factory=RSTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=lambda: ExpManagerConfig(
        checkpoint_callback_params=CheckpointCallbackParams(monitor="val_reward_mean", mode="max")))
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    model: RSModelConfig = field(default_factory=RSModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    remote_rm: RemoteRMConfig = field(default_factory=RemoteRMConfig)
    task_eval: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        check_batch_layout(self.trainer, self.model)
        check_monitor(self.exp_manager, RS_VALIDATION_METRICS)
