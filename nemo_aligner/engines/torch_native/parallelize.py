"""Turn a meta-device HF model into a parallel, materialised, loaded one."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from nemo_aligner.engines.torch_native.activation_checkpoint import apply_activation_checkpointing
from nemo_aligner.engines.torch_native.build import tied_aliases
from nemo_aligner.engines.torch_native.compile import apply_compile
from nemo_aligner.engines.torch_native.fsdp import apply_fsdp
from nemo_aligner.engines.torch_native.tensor_parallel import apply_tp


def parallelize(model: nn.Module, mesh: DeviceMesh, *, compute_dtype: torch.dtype, activation_checkpointing: bool,
                activation_checkpoint_layers: int | None, compile_layers: bool, fsdp: bool) -> None:
    """Apply, in this order and in place: tensor parallel (inner mesh dim), activation checkpointing,
    torch.compile (per decoder layer), FSDP (outer dim) unless the data-parallel ranks replicate the
    model (replicated.py then owns the gradients' reduction).

    FSDP must wrap parameters that are already TP DTensors to make them 2-D; checkpointing goes
    around a layer's whole call, so FSDP's gather hooks run again in the recomputation; compile sees
    the plain layer and FSDP's hooks stay outside its graph.
    """
    if mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model, activation_checkpoint_layers)
    if compile_layers:
        apply_compile(model)
    if fsdp:
        apply_fsdp(model, mesh["dp"], param_dtype=compute_dtype, reduce_dtype=torch.float32,
                   reshard_after_forward=mesh["dp"].size() > 1)


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) parameters on `device`, uninitialised (hf_load.py fills them).

    Buffers were built real (e.g. rotary tables) and `to_empty` would wipe them, so they are kept
    aside and restored; tied parameters (e.g. embeddings and LM head) are tied again.
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    aliases = tied_aliases(model)
    model.to_empty(device=device)
    for alias, owner in aliases.items():  # to_empty gives each name its own new parameter (FSDP keeps ties itself)
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(owner))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])

