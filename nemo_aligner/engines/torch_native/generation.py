"""Batched autoregressive generation with a KV cache over left-padded prompts."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from nemo_aligner.types import Generations, LengthParams, SamplingParams

# Decode steps between checks that every row has finished: each check reads a flag back from the device
# (and all-reduces it over data-parallel ranks), which stalls the host's launching of the next steps.
# Steps past the last row's EOS only add padding, which is cut off, so the output does not depend on it.
FINISHED_CHECK_INTERVAL = 8


def sample_next_token(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from `logits` [B, V] fp32: greedy, or temperature / top-k / top-p sampling."""
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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    sampling: SamplingParams,
    length: LengthParams,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
    dp_group: dist.ProcessGroup | None,
) -> Generations:
    """Extend left-padded prompts `input_ids` [B, P] until EOS or `length.max_length` new tokens.

    Every data-parallel rank runs the same number of forward passes (FSDP gathers weights in
    each), so a rank whose rows all finished keeps stepping until every rank has; whether they have
    is checked every FINISHED_CHECK_INTERVAL steps. Finished rows are filled with `pad_token_id`, and
    the responses end with the longest one.
    """
    batch = input_ids.shape[0]
    cache = cache_argument(module)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    response_lengths = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=True, logits_to_keep=1)
    for step in range(length.max_length):
        logits = _last_logits(out.logits)
        if step < length.min_length:
            logits[:, eos_token_id] = float("-inf")
        token = sample_next_token(logits, sampling, generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        response_lengths += (~finished).long()
        finished |= token == eos_token_id
        new_tokens.append(token)
        if step == length.max_length - 1 or ((step + 1) % FINISHED_CHECK_INTERVAL == 0
                                              and _all_finished(finished, dp_group)):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = module(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, logits_to_keep=1, **{cache: getattr(out, cache)})
    responses = torch.stack(new_tokens, dim=1) if new_tokens else input_ids[:, :0]
    longest = int(_longest(response_lengths, dp_group))
    responses = responses[:, :longest]  # the steps after every rank's last EOS produced only padding
    return Generations(tokens=torch.cat([input_ids, responses], dim=1),
                       prompt_lengths=attention_mask[:, : input_ids.shape[1]].sum(dim=-1),
                       response_lengths=response_lengths)


def cache_argument(module: nn.Module) -> str:
    """The name under which this transformers version passes and returns the KV cache: `cache`
    (transformers >= 5.2x) or `past_key_values` (earlier; deprecated later, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def _last_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] fp32 logits of the last position; gathers the vocab shards under tensor parallel."""
    last = logits[:, -1, :]
    if isinstance(last, DTensor):
        last = last.full_tensor()
    return last.float()


def _longest(response_lengths: torch.Tensor, dp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The longest response over every data-parallel rank (all ranks return equally wide tokens)."""
    longest = response_lengths.max().reshape(1) if response_lengths.numel() else response_lengths.new_zeros(1)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=dp_group)
    return longest


def _all_finished(finished: torch.Tensor, dp_group: dist.ProcessGroup | None) -> bool:
    unfinished = (~finished).sum().reshape(1)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(unfinished, group=dp_group)
    return int(unfinished.item()) == 0
