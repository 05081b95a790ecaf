"""Schema of examples/nlp/gpt/conf/gpt_dpo.yaml (NeMo-Aligner's key names)."""

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
    TrainerConfig,
    check_batch_layout,
    check_monitor,
)
from nemo_aligner.types import require


# What DPOTrainer's validation reports (val_<name> in the logs; a checkpoint monitor picks one).
DPO_VALIDATION_METRICS = ("loss", "preference_loss", "sft_loss", "acc", "rewards_chosen_mean", "rewards_rejected_mean",
                          "rewards_all_mean", "rewards_all_std", "rewards_margin_mean")


@dataclass
class DPOLossConfig:
    """model.dpo: the preference loss and its weights."""

    ref_policy_kl_penalty: float = 0.2  # beta
    preference_loss: str = "dpo"  # a name in nemo_aligner.losses.PREFERENCE_LOSSES (checked when the model is built)
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    preference_average_log_probs: bool = False  # R as a per-token mean instead of a sum
    sft_average_log_probs: bool = False  # SFT NLL as a per-token mean instead of a sum
    gt_reward_scale: float = 1.0  # scales the data's reward margin for the rpo_* losses
    log_prob_forward_micro_batch_size: int = 1  # pairs per forward pass for reference log-probs
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)

    def __post_init__(self) -> None:
        require(self.ref_policy_kl_penalty > 0, "model.dpo.ref_policy_kl_penalty", self.ref_policy_kl_penalty, "> 0")
        require(self.preference_loss_weight >= 0, "model.dpo.preference_loss_weight", self.preference_loss_weight, ">= 0")
        require(self.sft_loss_weight >= 0, "model.dpo.sft_loss_weight", self.sft_loss_weight, ">= 0")
        if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("model.dpo.preference_loss_weight and model.dpo.sft_loss_weight are both 0: nothing to train")
        require(self.log_prob_forward_micro_batch_size >= 1, "model.dpo.log_prob_forward_micro_batch_size",
                 self.log_prob_forward_micro_batch_size, ">= 1")


@dataclass
class DataPrefix:
    train: str = "examples/tiny/data/preference_train.jsonl"
    validation: str = "examples/tiny/data/preference_val.jsonl"
    test: Optional[str] = None


@dataclass
class PreferenceDataConfig(DataLoadingConfig):
    """model.data: preference JSONL files and how examples become batches."""

    data_prefix: DataPrefix = field(default_factory=DataPrefix)
    default_chosen_reward: float = 1.0  # when a line has no chosen_reward
    default_rejected_reward: float = 0.0  # when a line has no rejected_reward


@dataclass
class DPOModelConfig(ModelConfig):
    """model: the policy (micro/global batch sizes count preference pairs) plus dpo and data."""

    dpo: DPOLossConfig = field(default_factory=DPOLossConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)


@dataclass
class DPOLoopConfig(LoopConfig):
    section: ClassVar[str] = "trainer.dpo"


@dataclass
class DPOTrainerConfig(TrainerConfig):
    dpo: DPOLoopConfig = field(default_factory=DPOLoopConfig)


@dataclass
class DPOJobConfig:
    trainer: DPOTrainerConfig = field(default_factory=DPOTrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    # Optional held-out task evaluation before and after training: a Hydra `_target_` callable
    # taking the policy and returning {name: value}; null disables it.
    task_eval: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        check_batch_layout(self.trainer, self.model)
        check_monitor(self.exp_manager, DPO_VALIDATION_METRICS)
