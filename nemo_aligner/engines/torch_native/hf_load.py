"""Loading a Hugging Face model directory into the parallelised model, every rank reading only its part.

DCP's Hugging Face storage reader reads the safetensors files (one, or several with an index) straight
into this rank's pieces of the weights (FSDP shards, tensor-parallel slices, or the whole tensor where
the rank replicates it): no rank ever holds the full model, and nothing is broadcast (NeMo AutoModel's
Checkpointer loads base models the same way). Stored values are cast once into the parameters' dtype.
A directory whose tensor names are not the model's (e.g. a checkpoint transformers would have to
rename) is loaded through transformers on rank 0 and broadcast instead, as the log says.
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
    state = get_model_state_dict(model)
    stored = stored_tensor_names(path)
    wanted = {name: tensor for name, tensor in state.items() if stored is not None and name in stored}
    missing = sorted(set(state) - set(wanted) - set(tied_aliases(model)))
    if stored is None or missing:
        reason = "no safetensors files" if stored is None else f"tensors named otherwise, e.g. {missing[:3]}"
        log_rank0(logger, "%s has %s: loading it on rank 0 through transformers and broadcasting", path, reason)
        full = {}
        if dist.get_rank() == 0:
            full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).state_dict()
        load_full_state_dict(model, full)
        return
    dcp.load(wanted, storage_reader=dcp.HuggingFaceStorageReader(path))
    set_model_state_dict(model, wanted, options=StateDictOptions(strict=False))
    log_rank0(logger, "loaded %d tensors from %s, each rank reading its own part", len(wanted), path)


def load_full_state_dict(model: nn.Module, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Fill `model` from rank 0's full weights (the other ranks pass {}), broadcast piece by piece."""
    set_model_state_dict(model, full_state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))

