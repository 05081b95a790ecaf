"""Report an optional held-out task evaluation (the entry scripts' `task_eval` key) around training."""

from __future__ import annotations

import logging
from typing import Mapping

from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def report_task_eval(results: Mapping[str, float], when: str) -> None:
    """One log line (rank 0) per metric, e.g. `held-out task_accuracy <when>: 0.6100`."""
    for name, value in results.items():
        log_rank0(logger, "held-out %s %s: %.4f", name, when, value)
