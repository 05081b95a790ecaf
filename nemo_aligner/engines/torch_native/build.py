"""Build a Hugging Face causal LM from a local directory or a config, never touching a hub.

The network is created with parameters on `meta` (buffers real, e.g. rotary tables), so it
can be parallelised before any weight memory exists; rank 0 alone reads (or randomly inits)
the full weights, which are then broadcast shard by shard.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import (MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, PretrainedConfig)

from nemo_aligner.engines.hf_dir import random_init
from nemo_aligner.engines.torch_native.decode_attention import GROUPED_DECODE, register_grouped_decode_attention
from nemo_aligner.engines.torch_native.varlen_attention import VARLEN, register_varlen_attention

logger = logging.getLogger(__name__)



def attention_implementation(config: PretrainedConfig, requested: str | None, *, packed_on_cuda: bool) -> str:
    """`model.attn_implementation` if set, else PyTorch's SDPA where the family supports it, with decode
    steps that read the KV cache once (decode_attention.py), and eager attention otherwise (e.g. Gemma2,
    whose soft-capped attention SDPA cannot compute); for packed rows on CUDA in bf16, PyTorch's
    variable-length flash attention (varlen_attention.py) where SDPA would serve (flash attention has no
    fp32 kernel: fp32 packed rows take SDPA with a document mask, as on CPU)."""
    if requested == VARLEN and not packed_on_cuda:
        raise ValueError(f"model.attn_implementation={VARLEN} needs model.data.packing=true on CUDA in bf16")
    if requested is None:
        sdpa = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._supports_sdpa
        requested = (VARLEN if packed_on_cuda else GROUPED_DECODE) if sdpa else "eager"
    if requested == VARLEN:
        register_varlen_attention()
    if requested == GROUPED_DECODE:
        register_grouped_decode_attention()
    return requested


def build_meta_model(config: PretrainedConfig, attn_implementation: str, *, dtype: torch.dtype) -> nn.Module:
    """The network with every parameter on `meta` in `dtype` and every buffer materialised on CPU."""
    with _parameters_on_meta():
        try:
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        except (ValueError, ImportError) as err:  # an unknown kernel, one the family lacks, or a missing package
            raise ValueError(f"model.attn_implementation={attn_implementation!r}: {err}") from None


def random_init_on_rank0(config: PretrainedConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights seeded by `seed` on rank 0; {} elsewhere. The init happens once on one rank,
    so every parallel layout starts from the same weights."""
    if dist.get_rank() != 0:
        return {}
    logger.info("random init of %s (seed %d)", config.model_type, seed)
    return random_init(config, seed)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Parameter names that share another name's parameter (tied embeddings) -> that first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on `meta`; buffers keep their real values."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta param is re-registered as is: ties survive
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
