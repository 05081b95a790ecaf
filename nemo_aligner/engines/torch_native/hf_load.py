"""Loading a Hugging Face model directory into the parallelised model, every rank reading only its part.

DCP's Hugging Face storage reader reads the safetensors files (one, or several with an index) straight
into this rank's pieces of the weights (FSDP shards, tensor-parallel slices, or the whole tensor where
the rank replicates it): no rank ever holds the full model, and nothing is broadcast (NeMo AutoModel's
Checkpointer loads base models the same way). Stored values are cast once into the parameters' dtype.
A directory whose tensor names are not the model's (e.g. a checkpoint transformers would have to
rename) is loaded through transformers on rank 0 and broadcast instead, as the log says. Under LoRA the
base weights are matched by their Hugging Face names (lora.hf_name) and the adapters are left to
lora.init_adapters.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     set_model_state_dict)
from transformers import AutoModelForCausalLM

from nemo_aligner.engines.torch_native.build import tied_aliases
from nemo_aligner.engines.torch_native.lora import hf_name, is_adapter
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def stored_tensor_names(path: str) -> set[str] | None:
    """The tensor names of a safetensors HF directory (from its index, else the files' headers); None
    when it has no safetensors files."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    files = glob.glob(os.path.join(path, "*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.update(f.keys())
    return names


def load_hf_weights(model: nn.Module, path: str) -> None:
    """Fill the materialised (and parallelised) `model` from the HF directory `path`, in parallel where
    its tensor names are the model's; tied weights are read once, under their stored name."""
    state = {name: tensor for name, tensor in get_model_state_dict(model).items() if not is_adapter(name)}
    stored = stored_tensor_names(path)
    by_hf_name = {hf_name(name): name for name in state}
    wanted = {hf: state[name] for hf, name in by_hf_name.items() if stored is not None and hf in stored}
    missing = sorted(set(by_hf_name) - set(wanted) - {hf_name(alias) for alias in tied_aliases(model)})
    if stored is None or missing:
        reason = "no safetensors files" if stored is None else f"tensors named otherwise, e.g. {missing[:3]}"
        log_rank0(logger, "%s has %s: loading it on rank 0 through transformers and broadcasting", path, reason)
        full = {}
        if dist.get_rank() == 0:
            full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).state_dict()
        load_full_state_dict(model, full)
        return
    dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(path))
    set_model_state_dict(model, {by_hf_name[hf]: tensor for hf, tensor in wanted.items()}, options=StateDictOptions(strict=False))
    log_rank0(logger, "loaded %d tensors from %s, each rank reading its own part", len(wanted), path)


def load_full_state_dict(model: nn.Module, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Fill `model` from rank 0's full weights under their Hugging Face names (the other ranks pass {}),
    broadcast piece by piece; every weight but the adapters must be there."""
    keys = list(model.state_dict())
    names = [name for name in keys if not is_adapter(name)]
    if dist.get_rank() == 0:
        missing = sorted(hf_name(name) for name in names if hf_name(name) not in full_state_dict)
        if missing:
            raise ValueError(f"the weights lack {missing[:3]} ({len(missing)} in all)")
    renamed = {name: full_state_dict[hf_name(name)] for name in names} if dist.get_rank() == 0 else {}
    set_model_state_dict(model, renamed, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=len(names) == len(keys)))

