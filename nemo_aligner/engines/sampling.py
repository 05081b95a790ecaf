"""Token sampling for every engine's generation loop: greedy, or temperature / top-k / top-p by the
Gumbel-max rule, and how often a loop checks whether every row has finished."""

from __future__ import annotations

import torch

from nemo_aligner.types import SamplingParams

# Decode steps between checks that every row has finished: each check reads a flag back from the device
# (and all-reduces it over data-parallel ranks), which stalls the host's launching of the next steps.
# Steps past the last row's EOS only add padding, which is cut off, so the output does not depend on it.
FINISHED_CHECK_INTERVAL = 8


def sample_next_token(logits: torch.Tensor, sampling: SamplingParams, uniform: torch.Tensor | None) -> torch.Tensor:
    """One token per row from `logits` [B, V] fp32: greedy, or temperature / top-k / top-p sampling by the
    Gumbel-max rule with `uniform` [B, V] noise in (0, 1): argmax(logits / temperature - log(-log u)) over the
    kept tokens is a draw from their softmax. Each row's draw depends only on its own noise, so a row
    samples the same token whichever other rows share its batch (generate compacts finished rows away)."""
    if sampling.use_greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(dim=-1) - probs) > sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))
    return (logits + gumbel).argmax(dim=-1)
