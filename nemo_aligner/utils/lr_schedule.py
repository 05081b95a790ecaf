"""The learning-rate schedule of `model.optim.sched` as a function of the step, for every engine."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from nemo_aligner.config.schema import OptimConfig, SchedConfig, SchedulerName


def lr_at(step: int, *, lr: float, sched: SchedConfig, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Linear warm-up from lr/warmup_steps to lr, `constant_steps` at lr, then (CosineAnnealing) a
    cosine from lr to min_lr reached at `max_steps`, held after it. Constant stays at lr.
    """
    if step < sched.warmup_steps:
        return lr * (step + 1) / sched.warmup_steps
    if sched.name is SchedulerName.Constant:
        return lr
    decay_start = sched.warmup_steps + sched.constant_steps
    decay_steps = max(1, max_steps - decay_start)
    progress = min(1.0, max(0, step - decay_start) / decay_steps)
    return sched.min_lr + (lr - sched.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, max_steps: int) -> LambdaLR:
    """A LambdaLR that sets every group's lr to lr_at(step) (the groups' base lr is cfg.lr)."""
    return LambdaLR(optimizer, lambda step: lr_at(step, lr=cfg.lr, sched=cfg.sched, max_steps=max_steps) / cfg.lr)
