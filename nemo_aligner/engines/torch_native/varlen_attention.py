"""Attention for packed rows on CUDA: PyTorch's own variable-length flash attention, no extra wheels.

Registered with transformers as the attention implementation `torch_varlen`. A packed forward
(data/packing.py) passes the sequences' cumulative boundaries (`cu_seq_lens_q/k`, transformers' names
for packed flash attention) and a bound on their length; attention then runs per sequence, its cost
the sum of the sequences' squares, not the square of the packed row. A one-token query against a
padded KV cache (a decode step) and every other forward (unpacked training rows, prefill) take
the `sdpa_grouped_decode` implementation's path (decode_attention.py).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from nemo_aligner.engines.torch_native.decode_attention import grouped_decode_attention_forward

VARLEN = "torch_varlen"


def _varlen_kernel():  # noqa: ANN202
    """torch.nn.attention.varlen.varlen_attn (CUDA only); a function so that tests can stand in for it."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.cache
def _kernel_takes_gqa() -> bool:
    """Whether varlen_attn shares key/value heads itself (enable_gqa, torch >= 2.12); before, the caller repeats them."""
    return "enable_gqa" in inspect.signature(_varlen_kernel()).parameters


def varlen_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, H, N, D], key and value [1, H_kv, N, D] of one packed row -> ([1, N, H, D], None)."""
    if cu_seq_lens_q is None:
        return grouped_decode_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                scaling=scaling, **kwargs)
    if query.shape[0] != 1 or dropout:
        raise ValueError("varlen attention takes one packed row and no dropout")
    sliding_window = kwargs.get("sliding_window")
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # causal, optionally within a window
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, D]
    grouped = q.shape[1] != k.shape[1]
    gqa = {}
    if grouped and _kernel_takes_gqa():
        gqa = {"enable_gqa": True}
    elif grouped:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = _varlen_kernel()(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling,
                           window_size=window, **gqa)
    return out[None], None


def _mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for a row without padding (packed rows keep apart through cu_seq_lens); SDPA's otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Make `torch_varlen` an attention implementation transformers models can be built with (idempotent)."""
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _mask)
