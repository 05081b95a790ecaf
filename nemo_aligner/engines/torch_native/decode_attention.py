"""SDPA with a decode step that reads each cached key and value once.

Registered with transformers as the attention implementation `sdpa_grouped_decode`, the default where a
family supports SDPA. A one-token query against a padded KV cache (a decode step) folds the query heads
that share a key/value head into that head's query positions (grouped_one_token_attention); every other
forward (training rows, prefill) takes transformers' SDPA path unchanged, so scores equal plain `sdpa`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GROUPED_DECODE = "sdpa_grouped_decode"
# bmm of compute-dtype inputs into fp32 (CUDA; torch >= 2.8); without it, the scores' inputs are upcast first
_BMM_INTO_FP32 = "dtype" in torch.ops.aten.bmm.overloads()


def grouped_decode_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                     scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA forward, except for a decode step's attention (grouped_one_token_attention)."""
    if _foldable_one_token_query(query, key, attention_mask, dropout, kwargs):
        return grouped_one_token_attention(query, key, value, attention_mask, scaling=scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _foldable_one_token_query(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                              dropout: float, kwargs: dict[str, Any]) -> bool:
    """A decode step's attention that grouped_one_token_attention computes: one query position, key/value
    heads shared by several query heads, one padding mask for every head, nothing else SDPA would add."""
    return (query.shape[2] == 1 and query.shape[1] > key.shape[1] and attention_mask is not None
            and attention_mask.shape[1] == 1 and not dropout and kwargs.get("softcap") is None)


def grouped_one_token_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor, *, scaling: float | None) -> torch.Tensor:
    """query [B, H, 1, D] against key and value [B, H_kv, L, D] with mask [B, 1, 1, L] -> [B, 1, H, D].

    The H / H_kv query heads that share a key/value head are that head's queries at one position (no
    causality between them, one mask row for all), so each cached key and value is read once. The
    attention is written out: two batched matmuls and a softmax that torch.compile fuses, the scores
    accumulated and kept in fp32 as SDPA's kernels keep them (_fp32_scores), the probabilities then in
    the compute dtype. Masked SDPA would instead need transformers' repeat_kv (a copy of the cache per
    query head), and compiled it lowers to cuDNN with a copy of its inputs in every layer of every step:
    200 us per layer at 256 rows on an H200 (72 us of copy, 127 us of cuDNN), three quarters of the
    decode step."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h = kv * (H / H_kv) + g, as repeat_kv
    scores = _fp32_scores(folded, key) * (dim**-0.5 if scaling is None else scaling)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(batch, 1, heads, dim)


def _fp32_scores(folded: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """folded [B, H_kv, G, D] · key [B, H_kv, L, D]ᵀ -> [B, H_kv, G, L] in fp32. Rounding the scores to bf16
    (transformers' eager attention) moves each by up to 2⁻⁸ of its size, which in a trained model's confident
    rows still flips greedy choices that SDPA's fp32 scores keep. On CUDA the compute-dtype cache is read as
    it is and accumulated into fp32 (bmm's out_dtype); elsewhere (CPU: tests) both are upcast first."""
    if folded.dtype == torch.float32:
        return torch.matmul(folded, key.transpose(-1, -2))
    if folded.is_cuda and _BMM_INTO_FP32:
        batch, kv_heads, group, dim = folded.shape
        scores = torch.bmm(folded.reshape(batch * kv_heads, group, dim),
                           key.reshape(batch * kv_heads, -1, dim).transpose(1, 2), out_dtype=torch.float32)
        return scores.reshape(batch, kv_heads, group, -1)
    return torch.matmul(folded.float(), key.float().transpose(-1, -2))


def register_grouped_decode_attention() -> None:
    """Make `sdpa_grouped_decode` an attention implementation transformers models can be built with (idempotent);
    its masks are SDPA's."""
    AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_DECODE, sdpa_mask)
