"""Sharded model/optimizer checkpoints with DCP, and Hugging Face export with safetensors."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from nemo_aligner.engines.torch_native.replicated import ReplicatedParameters

MAX_SHARD_BYTES = 5 * 1024**3


def sharded_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """This rank's shards of the weights and optimizer state, as DCP writes them (layout-free)."""
    model_sd, optim_sd = get_state_dict(module, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_weights(module: nn.Module, path: str) -> None:
    """Each rank writes its shards of the weights only (DCP); `load_sharded(..., None, path)` reads them."""
    dcp.save({"model": get_model_state_dict(module)}, checkpoint_id=path)


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer | None, path: str) -> None:
    """Load a `sharded_state` checkpoint into any (dp, tp) layout; DCP reshards as needed."""
    if optimizer is None:
        state = {"model": get_model_state_dict(module)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["model"])
        return
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def replicated_state(module: nn.Module, replicated: ReplicatedParameters,
                     optimizer: torch.optim.Optimizer | None) -> dict[str, object]:
    """The training weights (the masters) and, given an optimizer, its state, in `sharded_state`'s
    layout-free form: the FSDP layout and this one load each other's checkpoints."""
    state: dict[str, object] = {"model": replicated.model_state_dict(module)}
    if optimizer is not None:
        state["optim"] = replicated.optimizer_state_dict(optimizer)
    return state


def load_replicated(module: nn.Module, replicated: ReplicatedParameters, optimizer: torch.optim.Optimizer | None,
                    path: str) -> None:
    """Read a `sharded_state` / `replicated_state` checkpoint into the masters (and optimizer state), in
    place, then rebuild the compute weights from them."""
    state: dict[str, object] = {"model": replicated.model_state_dict(module)}
    if optimizer is not None:
        state["optim"] = replicated.optimizer_state_dict(optimizer)
    dcp.load(state, checkpoint_id=path)
    if optimizer is not None:
        replicated.load_optimizer_state_dict(optimizer, state["optim"])  # type: ignore[arg-type]
    replicated.refresh_compute_weights()


def export_hf(
    module: nn.Module,
    config: PretrainedConfig,
    architecture: str,
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    *,
    dtype: torch.dtype,
) -> None:
    """Write `config.json`, `*.safetensors` (+ index when sharded) and tokenizer files to `path`.

    Every rank takes part in gathering the full weights; rank 0 writes into `path.tmp` and renames
    it at the end, so an interrupted export never leaves a directory that looks complete.
    """
    with _quiet_redistribute_notes():
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        aliases = _tied_aliases(module)
        tensors = {k: v.to(dtype).contiguous() for k, v in full.items() if k not in aliases}
        _write_safetensors(tensors, tmp)
        out_config = copy.deepcopy(config)
        out_config.architectures = [architecture]
        out_config.dtype = str(dtype).removeprefix("torch.")
        out_config.save_pretrained(tmp)
        generation_config = getattr(module, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


@contextlib.contextmanager
def _quiet_redistribute_notes() -> Iterator[None]:
    """Gathering FSDP x TP weights (dp-strided, tp-sharded) takes one all-gather per mesh dim, which
    DTensor logs on every rank as a performance warning; for a one-off export that is expected."""
    log = logging.getLogger("torch.distributed.tensor._redistribute")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _tied_aliases(module: nn.Module) -> set[str]:
    """Names that point at a parameter already listed under another name (tied embeddings)."""
    unique = {name for name, _ in module.named_parameters()}
    return {name for name, _ in module.named_parameters(remove_duplicate=False)} - unique


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: str) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
