"""Turn a meta-device HF model into a parallel, materialised, loaded one."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from nemo_aligner.engines.torch_native.fsdp import apply_fsdp
from nemo_aligner.engines.torch_native.tensor_parallel import apply_tp


def parallelize(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype) -> None:
    """Apply, in this order, tensor parallel (inner mesh dim) then FSDP (outer dim) in place.

    The order matters: FSDP must wrap parameters that are already TP DTensors to make them 2-D.
    """
    if mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"])
    apply_fsdp(model, mesh["dp"], param_dtype=param_dtype, reduce_dtype=torch.float32)


def materialize(model: nn.Module, device: torch.device, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Allocate the (sharded) parameters on `device` and fill them from rank 0's full weights.

    Buffers were built real (e.g. rotary tables) and `to_empty` would wipe them, so they are kept
    aside and restored.
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    set_model_state_dict(model, full_state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))
