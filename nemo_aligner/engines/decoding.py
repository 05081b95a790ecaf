"""What every engine's generation loop shares: token sampling (greedy, or temperature / top-k / top-p by the
Gumbel-max rule), how often the loop checks whether every row has finished, and the device memory a
generated row takes."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from nemo_aligner.types import SamplingParams

# Decode steps between checks that every row has finished: each check reads a flag back from the device
# (and all-reduces it over data-parallel ranks), which stalls the host's launching of the next steps.
# Steps past the last row's EOS only add padding, which is cut off, so the output does not depend on it.
FINISHED_CHECK_INTERVAL = 8
# fp32 [B, vocab] tensors a sampling step holds at once per row (logits, probabilities, sorted values and order)
SAMPLING_BUFFERS_PER_ROW = 4


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


def rollout_generator(seed: int, dp_rank: int, sampled_calls: int, device: torch.device) -> torch.Generator:
    """The RNG of a generate call: a function of (seed, data-parallel rank, sampled generate calls so far), so
    rollouts resume exactly and every rank of one tensor-parallel group draws the same tokens, whichever
    engine generates."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + dp_rank * 7_919 + sampled_calls)
    return generator


def generation_bytes_per_row(config: PretrainedConfig, cache_positions: int, *, compute_bytes: int, tp: int) -> int:
    """Device bytes one generated row takes on a tensor-parallel rank: its KV cache (every layer's keys and
    values over `cache_positions` positions, this rank's share of the key/value heads) and its fp32
    sampling buffers over the vocabulary."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = -(-(getattr(text, "num_key_value_heads", None) or heads) // tp)
    kv_cache = text.num_hidden_layers * 2 * kv_heads * head_dim * cache_positions * compute_bytes
    return kv_cache + SAMPLING_BUFFERS_PER_ROW * text.vocab_size * 4
