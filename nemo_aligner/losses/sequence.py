"""Per-sequence reductions of per-token log-probs over the response tokens a mask selects.

logprobs, mask: [N, T-1] (target-aligned, see nemo_aligner/types.py); each function returns [N]. A
row with no response tokens reduces to 0 (no division by zero).
"""

from __future__ import annotations

import torch


def _per_token_mean_if(summed: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    return summed / mask.sum(dim=-1).clamp(min=1.0) if average else summed


def sequence_nll(logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool) -> torch.Tensor:
    """−Σ_t m_t log π per row, divided by Σ_t m_t when `average`."""
    return _per_token_mean_if(-(logprobs * mask).sum(dim=-1), mask, average)


def masked_nll_sum(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−Σ m log π over every masked token of the batch (a scalar)."""
    return -(logprobs * mask).sum()
