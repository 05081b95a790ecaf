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
class PreferenceLossParams:
    """model.dpo.loss_params: the losses' own hyper-parameters; each loss reads the ones it names (README's table)."""

    label_smoothing: float = 0.0  # ε, the chance a label is flipped: dpo (ε > 0: conservative DPO), robust, aot, aot_pair
    exo_epsilon: float = 1.0e-3  # exo_pair: the smoothing of its target distribution
    simpo_gamma: float = 0.5  # simpo: the target reward margin γ
    orpo_lambda: float = 0.1  # orpo: the odds-ratio term's weight λ
    cpo_alpha: float = 1.0  # cpo: the behaviour-cloning (chosen NLL) term's weight
    discopop_tau: float = 0.05  # discopop: the temperature τ of its modulation

    def __post_init__(self) -> None:
        key = "model.dpo.loss_params."
        require(0 <= self.label_smoothing < 0.5, key + "label_smoothing", self.label_smoothing, "in [0, 0.5)")
        require(0 < self.exo_epsilon < 0.5, key + "exo_epsilon", self.exo_epsilon, "in (0, 0.5)")
        require(self.simpo_gamma >= 0, key + "simpo_gamma", self.simpo_gamma, ">= 0")
        require(self.orpo_lambda > 0, key + "orpo_lambda", self.orpo_lambda, "> 0")
        require(self.cpo_alpha >= 0, key + "cpo_alpha", self.cpo_alpha, ">= 0")
        require(0 < self.discopop_tau < 1, key + "discopop_tau", self.discopop_tau, "in (0, 1)")


@dataclass
class DPOLossConfig:
    """model.dpo: the preference loss(es) and their weights."""

    ref_policy_kl_penalty: float = 0.2  # beta
    # a name in nemo_aligner.losses.PREFERENCE_LOSSES, or a list of names whose weighted sum is the loss
    # (checked when the model is built)
    preference_loss: Any = "dpo"
    preference_loss_weights: Optional[list[float]] = None  # with a list of losses: one weight each; null: all 1
    loss_params: PreferenceLossParams = field(default_factory=PreferenceLossParams)
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
        names = self.preference_losses
        require(len(names) >= 1 and all(isinstance(n, str) for n in names) and len(set(names)) == len(names),
                "model.dpo.preference_loss", self.preference_loss, "a loss name or a list of distinct names")
        if self.preference_loss_weights is not None:
            weights = list(self.preference_loss_weights)
            require(len(weights) == len(names) and all(w >= 0 for w in weights) and sum(weights) > 0,
                    "model.dpo.preference_loss_weights", weights,
                    f"{len(names)} weights >= 0 (one per model.dpo.preference_loss), not all 0")

    @property
    def preference_losses(self) -> list[str]:
        """model.dpo.preference_loss as a list of names."""
        return list(self.preference_loss) if isinstance(self.preference_loss, (list, tuple)) else [self.preference_loss]

    @property
    def weights(self) -> list[float]:
        return list(self.preference_loss_weights) if self.preference_loss_weights is not None else [1.0] * len(self.preference_losses)


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
