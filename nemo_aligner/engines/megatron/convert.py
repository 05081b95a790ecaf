"""Hugging Face <-> megatron-core GPTModel weights, for the Llama-style families (llama, qwen2, qwen3, mistral).

Names and layouts (megatron's local layer spec):
  model.embed_tokens.weight            -> embedding.word_embeddings.weight
  layers.i.input_layernorm             -> decoder.layers.i.input_layernorm
  layers.i.self_attn.{q,k,v}_proj      -> decoder.layers.i.self_attention.linear_qkv: one block per key/value
                                          group, [that group's query heads; its key head; its value head]
  layers.i.self_attn.{q,k}_norm         -> decoder.layers.i.self_attention.{q,k}_layernorm (qwen3: per-head norms)
  layers.i.self_attn.o_proj            -> decoder.layers.i.self_attention.linear_proj
  layers.i.post_attention_layernorm    -> decoder.layers.i.pre_mlp_layernorm
  layers.i.mlp.{gate,up}_proj          -> decoder.layers.i.mlp.linear_fc1 ([gate; up]: megatron's gated unit
                                          applies the activation to the first half)
  layers.i.mlp.down_proj               -> decoder.layers.i.mlp.linear_fc2
  model.norm                           -> decoder.final_layernorm
  lm_head.weight                       -> output_layer.weight (absent when the embeddings are tied)
Both directions are exact (pure reindexing), so a round trip returns the same tensors.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from transformers import PretrainedConfig

HF_LAYER = "model.layers.{}."
MEGATRON_LAYER = "decoder.layers.{}."
# per layer, same tensor under both names
RENAMED = {"input_layernorm.weight": "input_layernorm.weight",
           "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
           "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
           "mlp.down_proj.weight": "mlp.linear_fc2.weight"}
# per layer, qwen3's norms of each query and key head (megatron's qk_layernorm)
QK_NORMS = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
            "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}


def has_qk_norms(config: PretrainedConfig) -> bool:
    """Whether the family normalises each query and key head before RoPE (qwen3)."""
    return config.model_type == "qwen3"


def _heads(config: PretrainedConfig) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PretrainedConfig) -> torch.Tensor:
    """q [H*d, ...], k and v [G*d, ...] -> megatron's [G * (H/G + 2) * d, ...], one block per group."""
    heads, groups, head_dim = _heads(config)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * head_dim, *rest)
    k, v = (t.reshape(groups, head_dim, *rest) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, config: PretrainedConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of fuse_qkv."""
    heads, groups, head_dim = _heads(config)
    rest = qkv.shape[1:]
    blocks = qkv.reshape(groups, (heads // groups + 2) * head_dim, *rest)
    q, k, v = blocks.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def conversions(config: PretrainedConfig, read: Callable[[str], torch.Tensor], *,
                qkv_bias: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Every megatron weight name -> how to make it from Hugging Face tensors that `read(name)` returns:
    nothing is read until a weight is made, so a rank makes only the weights it holds."""
    out: dict[str, Callable[[], torch.Tensor]] = {
        "embedding.word_embeddings.weight": functools.partial(read, "model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": functools.partial(read, "model.norm.weight")}
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = functools.partial(read, "lm_head.weight")
    for i in range(config.num_hidden_layers):
        hf, mg = HF_LAYER.format(i), MEGATRON_LAYER.format(i)
        for hf_name, mg_name in {**RENAMED, **(QK_NORMS if has_qk_norms(config) else {})}.items():
            out[mg + mg_name] = functools.partial(read, hf + hf_name)
        attn = hf + "self_attn."
        for kind in ("weight", "bias") if qkv_bias else ("weight",):
            out[f"{mg}self_attention.linear_qkv.{kind}"] = functools.partial(
                lambda attn, kind: fuse_qkv(*(read(f"{attn}{p}_proj.{kind}") for p in "qkv"), config), attn, kind)
        out[mg + "mlp.linear_fc1.weight"] = functools.partial(
            lambda hf: torch.cat([read(hf + "mlp.gate_proj.weight"), read(hf + "mlp.up_proj.weight")]), hf)
    return out


def check_all_converted(names: set[str], config: PretrainedConfig, *, qkv_bias: bool) -> None:
    """Raise unless every Hugging Face tensor name has a megatron counterpart."""
    unused = sorted(names - set(_hf_names(config, qkv_bias=qkv_bias)))
    if unused:
        raise ValueError(f"Hugging Face weights with no megatron counterpart: {unused[:5]}")


def hf_to_megatron(state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """A Hugging Face causal-LM state dict -> megatron GPTModel's (every tensor accounted for)."""
    qkv_bias = f"{HF_LAYER.format(0)}self_attn.q_proj.bias" in state
    check_all_converted(set(state), config, qkv_bias=qkv_bias)
    return {name: make() for name, make in conversions(config, state.__getitem__, qkv_bias=qkv_bias).items()}


def megatron_to_hf(state: dict[str, torch.Tensor], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_megatron (lm_head.weight is the embedding when tied, as transformers saves it)."""
    out = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
           "model.norm.weight": state["decoder.final_layernorm.weight"],
           "lm_head.weight": state["embedding.word_embeddings.weight" if config.tie_word_embeddings else "output_layer.weight"]}
    for i in range(config.num_hidden_layers):
        hf, mg = HF_LAYER.format(i), MEGATRON_LAYER.format(i)
        for hf_name, mg_name in {**RENAMED, **(QK_NORMS if has_qk_norms(config) else {})}.items():
            out[hf + hf_name] = state[mg + mg_name]
        q, k, v = split_qkv(state[mg + "self_attention.linear_qkv.weight"], config)
        out.update({f"{hf}self_attn.q_proj.weight": q, f"{hf}self_attn.k_proj.weight": k, f"{hf}self_attn.v_proj.weight": v})
        if mg + "self_attention.linear_qkv.bias" in state:
            q, k, v = split_qkv(state[mg + "self_attention.linear_qkv.bias"], config)
            out.update({f"{hf}self_attn.q_proj.bias": q, f"{hf}self_attn.k_proj.bias": k, f"{hf}self_attn.v_proj.bias": v})
        gate, up = state[mg + "mlp.linear_fc1.weight"].chunk(2)
        out.update({hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up})
    return out


# how megatron's tensor-parallel layers split each weight over the ranks
COLUMN_PARALLEL = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def tensor_parallel_shard(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s piece of megatron weight `name` under tensor parallelism of `size`: column-parallel
    weights (the fused qkv, whose per-group blocks then stay whole; the vocabulary) split along dim 0,
    row-parallel ones along dim 1, fc1 as [rank's gate rows; rank's up rows], norms whole."""
    if name.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    if name.endswith(COLUMN_PARALLEL):
        return tensor.chunk(size)[rank]
    if name.endswith(ROW_PARALLEL):
        return tensor.chunk(size, dim=1)[rank]
    return tensor


def layer_index(name: str) -> int | None:
    """The decoder layer a megatron weight name belongs to (None outside the decoder layers)."""
    return int(name.split(".")[2]) if name.startswith("decoder.layers.") else None


def renumbered(name: str, shift: int) -> str:
    """Megatron weight `name` with its decoder layer's number moved by `shift` (a stage or chunk numbers its
    layers from 0; the whole model from its first layer's offset)."""
    index = layer_index(name)
    return name if index is None else name.replace(f"decoder.layers.{index}.", f"decoder.layers.{index + shift}.", 1)


def pipeline_stage_state(state: dict[str, torch.Tensor], config: PretrainedConfig, stage: int,
                         stages: int) -> dict[str, torch.Tensor]:
    """The weights of pipeline stage `stage` of `stages` (megatron names): its contiguous share of the
    layers, renumbered from 0 as megatron numbers a stage's layers; the embedding on the first stage; the
    final norm and the output layer on the last (with tied embeddings, the embedding as its output layer)."""
    if config.num_hidden_layers % stages:
        raise ValueError(f"{config.num_hidden_layers} layers do not split evenly into {stages} pipeline stages")
    per_stage = config.num_hidden_layers // stages
    first, last = stage == 0, stage == stages - 1
    out = {}
    for name, tensor in state.items():
        index = layer_index(name)
        if index is not None:
            if stage * per_stage <= index < (stage + 1) * per_stage:
                out[renumbered(name, -stage * per_stage)] = tensor
        elif name.startswith("embedding.") and first:
            out[name] = tensor
        elif name.startswith(("decoder.final_layernorm.", "output_layer.")) and last:
            out[name] = tensor
    if last and not first and config.tie_word_embeddings:
        out["output_layer.weight"] = state["embedding.word_embeddings.weight"]
    return out


def _hf_names(config: PretrainedConfig, *, qkv_bias: bool) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]  # tied: the embedding's alias
    for i in range(config.num_hidden_layers):
        hf = HF_LAYER.format(i)
        names += [hf + n for n in {**RENAMED, **(QK_NORMS if has_qk_norms(config) else {})}]
        names += [f"{hf}mlp.{p}_proj.weight" for p in ("gate", "up")]
        names += [f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv" for kind in (("weight", "bias") if qkv_bias else ("weight",))]
    return names


def tensor_parallel_unshard(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The whole megatron weight `name` from every tensor-parallel rank's piece (the inverse of
    tensor_parallel_shard)."""
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(piece.chunk(2) for piece in pieces))
        return torch.cat([torch.cat(gates), torch.cat(ups)])
    if name.endswith(COLUMN_PARALLEL):
        return torch.cat(pieces)
    if name.endswith(ROW_PARALLEL):
        return torch.cat(pieces, dim=1)
    return pieces[0]


def stage_to_model_names(state: dict[str, torch.Tensor], config: PretrainedConfig,
                         layer_offset: int) -> dict[str, torch.Tensor]:
    """A pipeline stage's (or virtual-pipeline chunk's) weights under the whole model's names (the inverse
    of pipeline_stage_state): its layers renumbered from `layer_offset`; a tied output layer (the
    embedding's copy on the last stage of several) dropped."""
    return {renumbered(name, layer_offset): tensor for name, tensor in state.items()
            if not (name == "output_layer.weight" and config.tie_word_embeddings)}
