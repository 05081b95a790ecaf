"""AdamW, and clipping by the true global grad norm over parameters on several meshes."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nemo_aligner.config.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (1-D norms and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


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
        square = _squared_full_norm(norm) if isinstance(norm, DTensor) else norm.float() ** 2
        total_sq = total_sq.to(square.device) + square
    return total_sq.sqrt()


def _squared_full_norm(norm: DTensor) -> torch.Tensor:
    """The squared L2 norm behind a DTensor norm, from its local partial norms.

    Summing the squared partials ourselves takes one all-reduce when the partial dims span the
    whole job (TP x DP), where DTensor's own redistribute runs one per mesh dim (and warns).
    """
    mesh = norm.device_mesh
    partial_dims = [dim for dim, placement in enumerate(norm.placements) if placement.is_partial()]
    square = norm.to_local().float() ** 2
    if len(partial_dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        dist.all_reduce(square)
    else:
        for dim in partial_dims:
            dist.all_reduce(square, group=mesh.get_group(dim))
    return square


@torch.no_grad()
def scale_grads_(params: list[nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
