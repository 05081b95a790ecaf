"""AdamW, the warm-up / constant / cosine LR schedule, and clipping by the true global grad norm."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from nemo_aligner.config.schema import OptimConfig, SchedConfig, SchedulerName


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (1-D norms and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


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
    return LambdaLR(optimizer, lambda step: lr_at(step, lr=cfg.lr, sched=cfg.sched, max_steps=max_steps) / cfg.lr)


@torch.no_grad()
def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients as if unsharded, identical on every rank.

    Parameters live on different meshes (2-D for TP'd weights, dp-only for norms), and DTensor
    cannot stack norms across meshes, so each mesh's partial norm is completed separately.
    """
    by_mesh: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p.grad)
    total_sq = torch.zeros((), dtype=torch.float32)
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total_sq = total_sq.to(norm.device) + norm.float() ** 2
    return total_sq.sqrt()


@torch.no_grad()
def scale_grads_(params: list[nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
