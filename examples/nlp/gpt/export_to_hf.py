"""Export a training checkpoint (or the pretrained weights) as a Hugging Face model directory.

    torchrun --nproc_per_node 1 examples/nlp/gpt/export_to_hf.py \
        checkpoint_path=results/checkpoints output_path=results/hf_export
"""

from __future__ import annotations

import logging
import os

import entry_setup  # noqa: F401  (repository-relative paths; the embedded example importable)
import hydra
from omegaconf import DictConfig

from nemo_aligner.config.jobs import ExportToHFConfig
from nemo_aligner.config.loader import load_config
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.utils.checkpoint import LATEST, latest_checkpoint
from nemo_aligner.utils.distributed import log_rank0
from nemo_aligner.utils.errors import report_input_errors

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> str:
    """A step_N directory as given, or the one a checkpoints directory's `latest` names."""
    path = latest_checkpoint(path) or path
    if not os.path.isdir(os.path.join(path, "model")):
        raise FileNotFoundError(f"checkpoint_path '{path}' is neither a step_N checkpoint nor a folder with a '{LATEST}' file")
    return path


@hydra.main(config_path="conf", config_name="export_to_hf", version_base=None)
@report_input_errors
def main(raw: DictConfig) -> None:
    cfg = load_config(ExportToHFConfig, raw)
    checkpoint = resolve_checkpoint(cfg.checkpoint_path) if cfg.checkpoint_path else None
    model = GPTModel(cfg.model, cfg.pretrained_checkpoint, cfg.trainer)
    if checkpoint is not None:
        model.load(os.path.join(checkpoint, "model"), with_optimizer=False)
    model.export_hf(cfg.output_path)
    log_rank0(logger, "exported %s to %s", checkpoint or cfg.pretrained_checkpoint.restore_from_path, cfg.output_path)


if __name__ == "__main__":
    main()
