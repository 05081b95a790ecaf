"""torch's own multi-tensor kernels in the slots megatron-core fills from TransformerEngine or apex when one
is installed. Without either, megatron falls back to per-tensor Python loops (megatron.core.utils.local_*),
and its gradient-norm fallback turns every tensor's norm into a Python float: one host synchronisation per
parameter tensor (170 for the Qwen2.5-0.5B shape) in every optimizer step, which leaves the GPU idle between
them. These keep the work on the device, a handful of launches per step."""

from __future__ import annotations

import torch
from megatron.core import utils as megatron_utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer


def foreach_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                    per_tensor: bool, *args: object) -> tuple[torch.Tensor, None]:
    """apex's multi_tensor_l2norm contract: the L2 norm of every tensor in `tensor_lists`, as a [1] fp32
    tensor on their device (and no per-tensor norms)."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms are not asked for by megatron's gradient clipping")
    norms = torch._foreach_norm([t for tensors in tensor_lists for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def foreach_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                  scale: float) -> None:
    """apex's multi_tensor_scale contract: tensor_lists[1][i] = tensor_lists[0][i] * scale (in place when
    they are the same tensors, as in gradient clipping)."""
    sources, targets = tensor_lists
    if all(source is target for source, target in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    elif scale == 1.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, scale))


def install() -> None:
    """Fill the slots that hold megatron's per-tensor fallbacks (TransformerEngine's or apex's kernels,
    when megatron found one, stay)."""
    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, megatron_optimizer):
        if module.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
