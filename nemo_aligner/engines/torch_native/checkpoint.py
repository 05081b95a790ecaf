"""Sharded model/optimizer checkpoints with DCP, and Hugging Face export with safetensors."""

from __future__ import annotations

import copy
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
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
    weights: dict[str, torch.Tensor],
    config: PretrainedConfig,
    architecture: str,
    tokenizer: PreTrainedTokenizerBase,
    path: str,
    *,
    dtype: torch.dtype,
) -> None:
    """Write `config.json`, `*.safetensors` (+ index when sharded) and tokenizer files to `path`.

    `weights` are this rank's pieces of the training weights by state-dict name (DTensor shards, or
    whole tensors where replicated). No rank gathers the model: each writes its pieces (cast to
    `dtype`) through DCP's Hugging Face storage writer, which then consolidates them file by file into
    full safetensors of at most MAX_SHARD_BYTES. Everything goes to `path.tmp`, renamed at the end, so
    an interrupted export never leaves a directory that looks complete.
    """
    tmp = path.rstrip("/") + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    aliases = _tied_aliases(module)
    tensors = {name: tensor.detach().to(dtype) for name, tensor in weights.items() if name not in aliases}
    files = _file_of_each_tensor(tensors)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(tmp, fqn_to_index_mapping=files, save_distributed=True,
                                                                 enable_consolidation=True))
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.join(tmp, "sharded"))  # the per-rank pieces, now consolidated
        if max(files.values()) == 1:  # one file: the name transformers writes for an unsharded model
            os.replace(os.path.join(tmp, "model-00001-of-00001.safetensors"), os.path.join(tmp, "model.safetensors"))
            os.remove(os.path.join(tmp, "model.safetensors.index.json"))
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


def _file_of_each_tensor(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Tensor name -> output file (1, 2, ...), in order, starting a new file before MAX_SHARD_BYTES is passed."""
    files, index, size = {}, 1, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()  # DTensor: the global size
        if size and size + nbytes > MAX_SHARD_BYTES:
            index, size = index + 1, 0
        files[name] = index
        size += nbytes
    return files


def _tied_aliases(module: nn.Module) -> set[str]:
    """Names that point at a parameter already listed under another name (tied embeddings)."""
    unique = {name for name, _ in module.named_parameters()}
    return {name for name, _ in module.named_parameters(remove_duplicate=False)} - unique


