"""Sharded model/optimizer checkpoints with DCP, and Hugging Face export with safetensors."""

from __future__ import annotations

import copy
import os
import shutil
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from nemo_aligner.engines.torch_native.build import tied_aliases
from nemo_aligner.engines.torch_native.replicated import ReplicatedParameters

MAX_SHARD_BYTES = 5 * 1024**3


# Checkpoint formats (exp_manager.checkpoint_callback_params.model_save_format): torch_dist is one DCP
# checkpoint of {"model", "optim"}; safetensors keeps the weights as Hugging Face safetensors (full tensors
# under their HF names, in the training dtype) in WEIGHTS_DIR and the optimizer state as DCP in OPTIM_DIR.
CHECKPOINT_FORMATS = ("torch_dist", "safetensors")
WEIGHTS_DIR, OPTIM_DIR = "weights", "optim"
# Checkpoints hold what trains: every weight in full fine-tuning, the adapters under LoRA (the frozen base is
# the HF directory the run starts from). DCP's load has filled every tensor asked for before these are set,
# so strict=False only lets the frozen weights stay as they are.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


class HostStager(AsyncStager):
    """Where an asynchronous save copies its state before training goes on: one set of host buffers, made at
    the first save (pinned on CUDA, so that the copies run at the link's speed) and refilled by every later
    one. DCP's default stages into pageable memory allocated anew at every save: 3.6 s of stall for the
    0.5B shape's 6 GiB of weights and optimizer state on an H200, about 1.7 GB/s. torch's own reusable
    stager (DefaultStager) cannot serve a second save on torch 2.11, whose async_save closes the stager it
    is given, which empties its copy tables; closing this one keeps its buffers. The first save pays for
    making them (torch's _create_cpu_state_dict first copies each sharded tensor to pageable memory, then
    pins a second buffer): 53 s of stall for the 8B shape's 45 GB per rank on an H200, against 0.98 s for
    every later save. The caller must not stage again before the previous write has finished."""

    _synchronize_after_execute = False  # stage() returns once the copies are done

    def __init__(self, device: torch.device) -> None:
        self.pinned = device.type == "cuda"
        self.staged: dict[str, object] | None = None

    def stage(self, state_dict: dict[str, object]) -> dict[str, object]:
        if self.staged is None:
            self.staged = _create_cpu_state_dict(state_dict, pin_memory=self.pinned)
        return _copy_state_dict(state_dict, self.staged)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: stage() copies before it returns."""

    def close(self) -> None:
        """The buffers stay for the next save (the engine drops the stager with itself)."""


def write_state(state: dict[str, object], path: str, *, weights_format: str) -> None:
    """Collectively write `state` ({"model": ..., optionally "optim": ...}) to `path` in `weights_format`."""
    if weights_format == "torch_dist":
        dcp.save(state, checkpoint_id=path)
        return
    weights = _distinct(state["model"])  # type: ignore[arg-type]
    _write_safetensors(weights, os.path.join(path, WEIGHTS_DIR), _file_of_each_tensor(weights))
    if "optim" in state:
        dcp.save({"optim": state["optim"]}, checkpoint_id=os.path.join(path, OPTIM_DIR))


def read_state(state: dict[str, object], path: str) -> None:
    """Fill `state`'s tensors in place from a checkpoint of either format (told apart by its layout)."""
    weights = os.path.join(path, WEIGHTS_DIR)
    if not os.path.isdir(weights):
        dcp.load(state, checkpoint_id=path)
        return
    dcp.load(_distinct(state["model"]), storage_reader=dcp.HuggingFaceStorageReader(weights))  # type: ignore[arg-type]
    if "optim" in state:
        optim = {"optim": state["optim"]}
        dcp.load(optim, checkpoint_id=os.path.join(path, OPTIM_DIR))
        state["optim"] = optim["optim"]


def _distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` without the names whose storage an earlier name already has (tied weights), as HF
    safetensors store them: once, under the first name (the tie fills the other on load)."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def sharded_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    """This rank's shards of the weights and optimizer state, as DCP writes them (layout-free)."""
    model_sd, optim_sd = get_state_dict(module, optimizer, options=TRAINED_ONLY)
    return {"model": model_sd, "optim": optim_sd}


def save_weights(module: nn.Module, path: str) -> None:
    """Each rank writes its shards of the weights only (DCP); `load_sharded(..., None, path)` reads them."""
    dcp.save({"model": get_model_state_dict(module, options=TRAINED_ONLY)}, checkpoint_id=path)


def load_sharded(module: nn.Module, optimizer: torch.optim.Optimizer | None, path: str) -> None:
    """Load a checkpoint (either format) into any (dp, tp) layout; DCP reshards as needed."""
    if optimizer is None:
        state: dict[str, object] = {"model": get_model_state_dict(module, options=TRAINED_ONLY)}
        read_state(state, path)
        set_model_state_dict(module, state["model"], options=TRAINED_ONLY)  # type: ignore[arg-type]
        return
    model_sd, optim_sd = get_state_dict(module, optimizer, options=TRAINED_ONLY)
    state = {"model": model_sd, "optim": optim_sd}
    read_state(state, path)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],  # type: ignore[arg-type]
                   options=TRAINED_ONLY)


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
    read_state(state, path)
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
    also: Callable[[str], None] | None = None,
) -> None:
    """Write `config.json`, `*.safetensors` (+ index when sharded) and tokenizer files to `path`.

    `weights` are this rank's pieces of the training weights by state-dict name (DTensor shards, or
    whole tensors where replicated). No rank gathers the model: each writes its pieces (cast to
    `dtype`) through DCP's Hugging Face storage writer, which then consolidates them file by file into
    full safetensors of at most MAX_SHARD_BYTES. Everything goes to `path.tmp`, renamed at the end, so
    an interrupted export never leaves a directory that looks complete; `also(tmp)` (collective) writes
    more into it before the rename.
    """
    tmp = path.rstrip("/") + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    aliases = tied_aliases(module)
    tensors = {name: tensor.detach().to(dtype) for name, tensor in weights.items() if name not in aliases}
    _write_safetensors(tensors, tmp, _file_of_each_tensor(tensors))
    if dist.get_rank() == 0:
        out_config = copy.deepcopy(config)
        out_config.architectures = [architecture]
        out_config.dtype = str(dtype).removeprefix("torch.")
        out_config.save_pretrained(tmp)
        generation_config = getattr(module, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if also is not None:
        also(tmp)
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def _write_safetensors(tensors: dict[str, torch.Tensor], directory: str, files: dict[str, int]) -> None:
    """Each rank writes its pieces of `tensors` (DCP's Hugging Face storage writer), consolidated file by file
    into full tensors in `directory` (`files`: name -> file number); one file is named model.safetensors."""
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(directory, fqn_to_index_mapping=files,
                                                                 save_distributed=True, enable_consolidation=True))
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.join(directory, "sharded"))  # the per-rank pieces, now consolidated
        if max(files.values()) == 1:  # one file: the name transformers writes for an unsharded model
            os.replace(os.path.join(directory, "model-00001-of-00001.safetensors"),
                       os.path.join(directory, "model.safetensors"))
            os.remove(os.path.join(directory, "model.safetensors.index.json"))
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

