"""Tensor parallelism with DTensor: declarative per-family plans applied by parallelize_module."""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from nemo_aligner.engines.torch_native.lora import ADAPTER, LoraLayer
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def _llama_style_layer_plan() -> dict[str, ParallelStyle]:
    """Attention heads and MLP columns split across ranks; o_proj/down_proj all-reduce the output."""
    return {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }


def _with_adapters(layer: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """`plan` for a layer whose linear layers may carry LoRA adapters: the base layer keeps its style; a
    column-split layer splits B's columns too (A sees the whole input, B's input hook all-reduces A's
    gradient); a row-split one splits A's rows (A's output is all-reduced, B is whole)."""
    out: dict[str, ParallelStyle] = {}
    for name, style in plan.items():
        if not isinstance(layer.get_submodule(name), LoraLayer):
            out[name] = style
            continue
        out[f"{name}.base_layer"] = style
        if isinstance(style, ColwiseParallel):
            out[f"{name}.lora_B.{ADAPTER}"] = ColwiseParallel()
        else:
            out[f"{name}.lora_A.{ADAPTER}"] = RowwiseParallel()
    return out


def _root_plan() -> dict[str, ParallelStyle]:
    """Vocab-sharded embedding; the LM head keeps its logits vocab-sharded (a DTensor, Shard(-1))
    so log-probs are computed without ever gathering [tokens x vocab]."""
    return {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (a llama-style HF causal LM) over `tp_mesh` in place; re-ties tied embeddings."""
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    parallelize_module(model, tp_mesh, _root_plan())
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, _with_adapters(layer, _llama_style_layer_plan()))
    if tied:  # both are Shard(0) over the vocab, so one DTensor serves as both
        model.lm_head.weight = model.model.embed_tokens.weight
    log_rank0(logger, "applied tensor parallel over %d ranks (tied embeddings: %s)", tp_mesh.size(), tied)
