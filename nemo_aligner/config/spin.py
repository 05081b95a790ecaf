"""Schema of examples/nlp/gpt/conf/gpt_spin.yaml (NeMo-Aligner's key names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from nemo_aligner.config.schema import (
    DataLoadingConfig,
    ExpManagerConfig,
    LoopConfig,
    ModelConfig,
    PretrainedCheckpointConfig,
    ReferenceConfig,
    ReferenceStrategy,
    TrainerConfig,
    check_batch_layout,
    check_monitor,
)
from nemo_aligner.types import LengthParams, SamplingParams, require


# What SPINTrainer's validation reports: the SFT loss of the ground-truth responses.
SPIN_VALIDATION_METRICS = ("loss",)


@dataclass
class SPINConfig:
    """model.spin: the SPIN loss and how the rejected (self-generated) responses are made."""

    ref_policy_kl_penalty: Any = 0.1  # beta: a float, or a list with one value per iteration
    # prompts per generate call on one data-parallel rank; null: the most that fit in rollout_memory_fraction
    rollout_micro_batch_size: Optional[int] = 16
    rollout_memory_fraction: float = 0.5  # of the free device memory, for rollout_micro_batch_size null
    offload_adam_states: bool = True  # move optimizer state to CPU while generating
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    length_params: LengthParams = field(default_factory=LengthParams)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self) -> None:
        require(self.reference.strategy not in (ReferenceStrategy.precomputed, ReferenceStrategy.adapters_disabled),
                "model.spin.reference.strategy", self.reference.strategy.value,
                "auto, swap or resident: SPIN's reference changes every iteration (under LoRA they copy only the adapters)")
        betas = self.ref_policy_kl_penalty if isinstance(self.ref_policy_kl_penalty, (list, tuple)) else [self.ref_policy_kl_penalty]
        ok = len(betas) >= 1 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in betas)
        require(ok, "model.spin.ref_policy_kl_penalty", self.ref_policy_kl_penalty, "a number > 0 or a list of them")
        require(self.rollout_micro_batch_size is None or self.rollout_micro_batch_size >= 1,
                "model.spin.rollout_micro_batch_size", self.rollout_micro_batch_size, "null or >= 1")
        require(0 < self.rollout_memory_fraction <= 1, "model.spin.rollout_memory_fraction", self.rollout_memory_fraction,
                "in (0, 1]")


@dataclass
class SFTFileConfig:
    file_path: str = "examples/tiny/data/sft_train.jsonl"


@dataclass
class SFTDataConfig(DataLoadingConfig):
    """model.data: SFT JSONL files (input/output or chat messages)."""

    train_ds: SFTFileConfig = field(default_factory=SFTFileConfig)
    validation_ds: SFTFileConfig = field(default_factory=lambda: SFTFileConfig("examples/tiny/data/sft_val.jsonl"))


@dataclass
class SPINModelConfig(ModelConfig):
    """model: the policy (batch sizes count prompts, i.e. pairs of actual and generated) plus spin and data."""

    spin: SPINConfig = field(default_factory=SPINConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)


@dataclass
class SPINLoopConfig(LoopConfig):
    section: ClassVar[str] = "trainer.spin"
    max_iterations: int = 1  # reference updates: each iteration runs max_epochs over the data

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_iterations >= 1, "trainer.spin.max_iterations", self.max_iterations, ">= 1")


@dataclass
class SPINTrainerConfig(TrainerConfig):
    spin: SPINLoopConfig = field(default_factory=SPINLoopConfig)


@dataclass
class SPINJobConfig:
    trainer: SPINTrainerConfig = field(default_factory=SPINTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    model: SPINModelConfig = field(default_factory=SPINModelConfig)
    # Held-out task evaluation after every iteration (a Hydra `_target_` callable); null disables it.
    task_eval: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        check_batch_layout(self.trainer, self.model)
        check_monitor(self.exp_manager, SPIN_VALIDATION_METRICS)
        betas = self.model.spin.ref_policy_kl_penalty
        if isinstance(betas, (list, tuple)) and len(betas) != self.trainer.spin.max_iterations:
            raise ValueError(f"model.spin.ref_policy_kl_penalty has {len(betas)} values but trainer.spin.max_iterations="
                             f"{self.trainer.spin.max_iterations}; give one beta per iteration (or a single number)")
