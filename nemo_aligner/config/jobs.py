"""Top-level schemas of the entry scripts that are not an algorithm (algorithms add their own)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nemo_aligner.config.schema import ModelConfig, PretrainedCheckpointConfig, TrainerConfig


@dataclass
class ExportToHFConfig:
    """examples/nlp/gpt/export_to_hf.py: a training checkpoint (or the pretrained weights) to HF format."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint_path: Optional[str] = None  # a step_N dir, or a checkpoints dir (its `latest`); null: the pretrained weights
    output_path: str = "results/hf_export"
