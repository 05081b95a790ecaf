"""AdamW, and clipping by the true global grad norm over parameters on several meshes."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from nemo_aligner.config.schema import OptimConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, *, fused: bool) -> torch.optim.AdamW:
    """AdamW over `params` with weight decay on matrices only (1-D norms and biases are not decayed)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


@torch.no_grad()
def global_grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients as if unsharded, identical on every rank.

    Each rank sums the squares of its local gradient pieces, grouped by the mesh and the mesh dims
    the pieces are sharded over (TP'd weights: dp and tp; the rest: dp); one all-reduce per group
    completes each sum (a DTensor norm would reduce once per mesh dim, and warn about it).
    """
    groups: dict[tuple[object, tuple[int, ...]], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            if any(placement.is_partial() for placement in grad.placements):
                raise RuntimeError(f"a gradient is not reduced yet (placements {grad.placements})")
            sharded = tuple(dim for dim, placement in enumerate(grad.placements) if placement.is_shard())
            groups[(grad.device_mesh, sharded)].append(grad.to_local())
        else:
            groups[(None, ())].append(grad)
    total_sq = torch.zeros((), dtype=torch.float32)
    for (mesh, sharded), grads in groups.items():
        square = torch.nn.utils.get_total_norm(grads, norm_type=2.0).float() ** 2
        if sharded:
            _sum_over(square, mesh, sharded)  # type: ignore[arg-type]
        total_sq = total_sq.to(square.device) + square
    return total_sq.sqrt()


def _sum_over(tensor: torch.Tensor, mesh: DeviceMesh, dims: tuple[int, ...]) -> None:
    """All-reduce (sum) `tensor` in place over the ranks of `mesh` along `dims`."""
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        dist.all_reduce(tensor)  # the whole job: one collective
        return
    for dim in dims:
        dist.all_reduce(tensor, group=mesh.get_group(dim))


@torch.no_grad()
def clip_grads_(params: list[nn.Parameter], grad_norm: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients by min(1, max_norm / grad_norm) (0 disables), computed on the device, so nothing
    waits for the norm; one fused kernel per device and dtype (DTensors by their local pieces). A factor
    of exactly 1 leaves the gradients as they are."""
    if max_norm <= 0:
        return
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, (max_norm / (grad_norm + 1e-6)).clamp(max=1.0))
