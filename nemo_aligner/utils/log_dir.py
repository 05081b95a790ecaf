"""The run's log directory: the job's config is written into it once every input is validated."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from nemo_aligner.utils.distributed import is_rank0


def save_config(raw: Any, log_dir: str) -> None:
    """Create the log directory and write the job's config to `<log_dir>/config.yaml` (rank 0).

    Entry scripts call it once every input is validated, so nothing lands in the log directory
    before that.
    """
    if is_rank0():
        os.makedirs(log_dir, exist_ok=True)
        OmegaConf.save(raw, os.path.join(log_dir, "config.yaml"))
