"""Metric sinks on rank 0: metrics.jsonl always, TensorBoard by default, W&B when asked."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from nemo_aligner.utils.distributed import is_rank0
from nemo_aligner.utils.log_dir import METRICS_FILE

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Writes `{split}/{name}` scalars per step. Every method is a no-op off rank 0."""

    def __init__(self, log_dir: str, *, tensorboard: bool, wandb: bool, wandb_kwargs: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
        """Appends to `<log_dir>/metrics.jsonl`, which utils/log_dir.py has prepared for this run."""
        self.active = is_rank0()
        self.jsonl_path = os.path.join(log_dir, METRICS_FILE)
        self._tb = self._wandb = None
        if not self.active:
            return
        os.makedirs(log_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(log_dir, "tensorboard"))
        if wandb:
            self._wandb = _start_wandb(log_dir, wandb_kwargs, config)

    def log(self, split: str, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"split": split, "step": step, **metrics}) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{name}": value for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str, split: str) -> list[dict[str, Any]]:
    """The records of `split` in a metrics.jsonl file, in order."""
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _start_wandb(log_dir: str, kwargs: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ImportError("exp_manager.create_wandb_logger=true needs wandb: pip install 'nemo_aligner[wandb]'") from err
    return wandb.init(dir=log_dir, config=dict(config), resume="allow", **{k: v for k, v in kwargs.items() if v is not None})
