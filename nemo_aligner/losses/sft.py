"""Supervised (negative log-likelihood) losses over response tokens, normalised globally."""

from __future__ import annotations

import torch

from nemo_aligner.losses.sequence import masked_nll_sum, sequence_nll
from nemo_aligner.types import Batch


def sft_loss_fn(logprobs: torch.Tensor, batch: Batch, *,
                global_num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the token-mean NLL over the global batch.

    Dividing by the global token count (not the micro-batch's) makes the result independent of
    how micro-batches and data-parallel ranks split the batch.
    """
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    return masked_nll_sum(logprobs, mask) / global_num_tokens, {}


def sequence_mean_nll_loss_fn(logprobs: torch.Tensor, batch: Batch, *,
                              global_sequences: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mean over the global batch's sequences of each sequence's
    token-mean NLL (rejection sampling's fine-tuning loss)."""
    mask = batch["loss_mask"][:, 1:].to(logprobs.dtype)
    return sequence_nll(logprobs, mask, average=True).sum() / global_sequences, {}
