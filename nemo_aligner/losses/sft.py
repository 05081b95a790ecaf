"""The supervised (negative log-likelihood) loss over response tokens."""

from __future__ import annotations

import torch

from nemo_aligner.engines.base import Batch


def masked_nll_sum(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of -log p over masked tokens. logprobs: [B, T-1]; loss_mask: [B, T-1] (target-aligned)."""
    return -(logprobs * loss_mask).sum()


def sft_loss_fn(logprobs: torch.Tensor, batch: Batch, *, global_num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the token-mean NLL over the global batch.

    Dividing by the global token count (not the micro-batch's) makes the result independent of
    how micro-batches and data-parallel ranks split the batch.
    """
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    return masked_nll_sum(logprobs, mask) / global_num_tokens, {}
