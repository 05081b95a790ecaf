"""Data parallel by replication, with master weights kept inside the optimizer (Megatron's "O2" scheme).

Every data-parallel rank holds the whole model (its tensor-parallel piece): no gather before a layer
and no reduce-scatter after one, which is what a model that fits wants (FSDP2's per-layer hooks and
DTensor dispatch cost more host time than an H200 needs for a 0.5B model's step). Under bf16
mixed precision the module's parameters *are* the bf16 compute weights: nothing is cast in a forward.
The fp32 masters live here, with fp32 gradient buffers that every backward adds into (a hook per
parameter), so gradients accumulate over micro-batches in fp32 and are all-reduced once per step
over one flat buffer. The optimizer (AdamW) updates the masters; the compute weights are then
refreshed from them in one fused copy. Without mixed precision (fp32, bf16_pure) the parameters are
their own masters.

Checkpoints are written in the layout-free form `get_state_dict` gives for FSDP (weights and
optimizer state keyed by parameter name), so this layout and the FSDP one load each other's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nemo_aligner.engines.torch_native.optim import clip_grads_, global_grad_norm


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`local` as a DTensor placed like `reference` when that is one (sharing `local`'s storage)."""
    if not isinstance(reference, DTensor):
        return local
    return DTensor.from_local(local, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())


class ReplicatedParameters:
    """The training state of a replicated module: masters, fp32 gradient buffers, their reduction."""

    def __init__(self, module: nn.Module, dp_group: dist.ProcessGroup, *, compute_dtype: torch.dtype) -> None:
        """Takes the module's parameters (in the master dtype) as the masters, then turns the parameters
        into compute-dtype copies of them when the two dtypes differ."""
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]  # tied: once
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group)
        master_dtype = self.params[0].dtype
        self.has_masters = compute_dtype != master_dtype
        self.masters: list[nn.Parameter] = self.params
        if self.has_masters:
            self.masters = [nn.Parameter(p.detach().clone()) for p in self.params]
            for p in self.params:  # in place, so the module, compiled layers and TP plans keep their parameters
                torch.utils.swap_tensors(p, nn.Parameter(p.detach().to(compute_dtype)))
        locals_ = [_local(p) for p in self.params]
        self.flat_grad = torch.zeros(sum(t.numel() for t in locals_), dtype=master_dtype, device=locals_[0].device)
        self.grad_pieces: list[torch.Tensor] = []
        offset = 0
        for local in locals_:
            self.grad_pieces.append(self.flat_grad[offset:offset + local.numel()].view(local.shape))
            offset += local.numel()

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """Add the gradients of the backward just run to the buffers (one fused add) and free them.

        Called after every micro-batch's backward, so the sum over micro-batches is taken in the
        master dtype whatever the compute dtype.
        """
        pieces, grads = [], []
        for param, piece in zip(self.params, self.grad_pieces):
            grad = param.grad
            if grad is None:
                continue
            if isinstance(grad, DTensor) and grad.placements != param.placements:  # e.g. a tied weight's
                grad = grad.redistribute(placements=param.placements)
            pieces.append(piece)
            grads.append(_local(grad))
            param.grad = None
        torch._foreach_add_(pieces, grads)

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the masters."""
        return self.masters

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        """All-reduce the summed gradients, clip by the global norm, step, refresh the compute weights.

        The losses are shares of the global mean, so the reduction is a sum. Returns the norm before
        clipping; a non-finite norm skips the update (the caller raises) and clears the gradients.
        With a fused (CUDA) optimizer over plain masters nothing waits for the norm: the clip factor is
        applied on the device and a non-finite norm makes the fused kernel skip the update (its
        `found_inf`), so the host launches the whole step before it reads the norm back.
        """
        if self.dp_size > 1:
            dist.all_reduce(self.flat_grad, group=self.dp_group)
        for master, piece in zip(self.masters, self.grad_pieces):
            master.grad = _like(piece, master)
        try:
            grad_norm = global_grad_norm(self.masters)
            # fused AdamW's found_inf is a plain tensor: kept to plain (non-tensor-parallel) masters
            on_device = optimizer.defaults.get("fused", False) and not isinstance(self.masters[0], DTensor)
            if not on_device and not torch.isfinite(grad_norm):
                return grad_norm
            clip_grads_(self.masters, grad_norm, max_grad_norm)
            if on_device:
                optimizer.found_inf = (~torch.isfinite(grad_norm)).float()  # type: ignore[attr-defined]
            optimizer.step()
            if self.has_masters:
                self.refresh_compute_weights()
            return grad_norm
        finally:
            for master in self.masters:
                master.grad = None
            self.flat_grad.zero_()

    @torch.no_grad()
    def refresh_compute_weights(self) -> None:
        """Compute weights <- masters, rounded to the compute dtype (a no-op without masters)."""
        if self.has_masters:
            torch._foreach_copy_([_local(p) for p in self.params], [_local(m) for m in self.masters])

    def gradients(self) -> dict[str, torch.Tensor]:
        """The gradients accumulated since the last step (not yet reduced over data-parallel ranks), by
        parameter name, placed like their parameters."""
        return {name: _like(piece, p) for name, p, piece in zip(self.names, self.params, self.grad_pieces)}

    def training_tensors(self) -> list[torch.Tensor]:
        """Tensors only training reads (masters and gradient buffers), which may leave the device while
        the compute weights generate."""
        return [self.flat_grad, *(_local(m) for m in self.masters)] if self.has_masters else [self.flat_grad]

    # -------------------------------------------------------------- checkpoints
    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every state-dict key of the module (tied names included) -> its master."""
        by_param = {id(p): m for p, m in zip(self.params, self.masters)}
        keys = module.state_dict(keep_vars=True)
        return {key: by_param[id(value)] for key, value in keys.items() if id(value) in by_param}

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, object]:
        """The optimizer state keyed by parameter name, as `get_state_dict` gives it; state is created
        (zeros, step 0) where no step has run yet, so that a load has tensors to fill."""
        for master in self.masters:
            if not optimizer.state[master]:
                optimizer.state[master].update(step=torch.zeros((), dtype=torch.float32, device=_local(master).device),
                                               exp_avg=torch.zeros_like(master), exp_avg_sq=torch.zeros_like(master))
        name_of = {id(m): name for name, m in zip(self.names, self.masters)}
        groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [name_of[id(p)] for p in group["params"]]}
                  for group in optimizer.param_groups]
        return {"state": {name_of[id(m)]: optimizer.state[m] for m in self.masters}, "param_groups": groups}

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, loaded: dict[str, object]) -> None:
        """After a DCP load into `optimizer_state_dict`'s tensors (filled in place): the groups' values."""
        for group, saved in zip(optimizer.param_groups, loaded["param_groups"]):  # type: ignore[arg-type]
            group.update({k: v for k, v in saved.items() if k != "params"})
