"""Generation on megatron's GPTModel (one pipeline stage) against megatron's static KV cache: the prompts are
prefilled with a mask that hides their left padding, each later step feeds one token per row, and the
next token is sampled from the last position's logits (gathered over the tensor-parallel vocabulary
slices). Under sequence parallelism every step recomputes the sequence so far instead."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from torch import nn

from nemo_aligner.engines.megatron.build import cuda_placements_on_cpu
from nemo_aligner.engines.megatron.layout import MegatronLayout
from nemo_aligner.engines.decoding import FINISHED_CHECK_INTERVAL, sample_next_token
from nemo_aligner.types import Generations, LengthParams, SamplingParams


def hidden_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where a query may not look (megatron's convention): later positions and
    padding. A padding position sees itself, so that no query row is wholly hidden (which some attention
    kernels turn into NaN); no real token ever sees it."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    visible = (causal[None] & attention_mask.bool()[:, None, :]) | itself
    return ~visible[:, None]


@torch.no_grad()
def generate(module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, sampling: SamplingParams,
             length: LengthParams, eos_token_id: int, pad_token_id: int, generator: torch.Generator | None,
             layout: MegatronLayout) -> Generations:
    """Extend left-padded prompts `input_ids` [B, P] until EOS or `length.max_length` new tokens. Ranks
    of one tensor-parallel group draw the same tokens (same seed, same gathered logits); data-parallel
    ranks stop on their own and agree on the width of the output."""
    batch = input_ids.shape[0]
    device = input_ids.device
    tokens, mask = input_ids, attention_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    response_lengths = torch.zeros(batch, dtype=torch.long, device=device)
    responses = torch.full((batch, length.max_length), pad_token_id, dtype=torch.long, device=device)
    # megatron's static KV cache, except under sequence parallelism (one new token cannot be split over the
    # TP ranks), where every step recomputes the sequence so far
    cache = None if layout.sequence_parallel else StaticInferenceContext(batch, input_ids.shape[1] + length.max_length)
    for step in range(length.max_length):
        if cache is not None and step > 0:  # the newest token against every cached position
            ids, hidden = tokens[:, -1:], ~mask.bool()[:, None, None, :]
        else:
            ids, attend = tokens, mask
            pad = -tokens.shape[1] % layout.sequence_multiple  # sequence parallelism splits the sequence evenly
            if pad:
                ids, attend = F.pad(tokens, (pad, 0), value=pad_token_id), F.pad(mask, (pad, 0), value=0)
            hidden = hidden_positions(attend)
        logits = _whole_vocabulary(_last_position_logits(module, ids, hidden, layout, cache), layout)
        if cache is not None:
            cache.sequence_len_offset += ids.shape[1]
            cache.enable_decode_mode()
        if step < length.min_length:
            logits[:, eos_token_id] = float("-inf")
        uniform = None if sampling.use_greedy else torch.rand(logits.shape, generator=generator, device=device)
        token = torch.where(finished, torch.full_like(finished, pad_token_id, dtype=torch.long),
                            sample_next_token(logits, sampling, uniform))
        response_lengths += (~finished).long()
        finished |= token == eos_token_id
        responses[:, step] = token
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if (step + 1) % FINISHED_CHECK_INTERVAL == 0 and bool(finished.all()):
            break
    longest = response_lengths.max().reshape(1) if batch else response_lengths.new_zeros(1)
    if layout.dp_size > 1:
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=layout.dp_group)
    return Generations(tokens=torch.cat([input_ids, responses[:, : int(longest)]], dim=1),
                       prompt_lengths=attention_mask.sum(dim=-1), response_lengths=response_lengths)


def _last_position_logits(module: nn.Module, ids: torch.Tensor, hidden: torch.Tensor, layout: MegatronLayout,
                          cache: StaticInferenceContext | None) -> torch.Tensor:
    """[B, V / tp] fp32 logits of the last position of `ids` (keys hidden where `hidden`; with `cache`, after
    the cached positions): the final hidden states come out of the model (its post-processing switched off
    for the call) and only the last one meets this rank's slice of the output layer. RoPE is applied by
    position in the sequence, left padding included: a row's tokens all shift by its padding, which
    leaves every relative position, and so every attention score, as it is."""
    module.post_process = False
    try:
        with cuda_placements_on_cpu():
            states = module(input_ids=ids, position_ids=None, attention_mask=hidden, inference_context=cache,
                            runtime_gather_output=True)  # megatron asserts it whenever a cache is given
            if layout.sequence_parallel:
                states = gather_from_sequence_parallel_region(states, tensor_parallel_output_grad=False)
    finally:
        module.post_process = True
    weight = (module.shared_embedding_or_output_weight() if module.share_embeddings_and_output_weights
              else module.output_layer.weight)
    return (states[-1] @ weight.T).float()


def _whole_vocabulary(logits: torch.Tensor, layout: MegatronLayout) -> torch.Tensor:
    """[B, V / tp] logits of this rank's vocabulary slice -> [B, V]."""
    if layout.tp_size == 1:
        return logits
    pieces = [torch.empty_like(logits) for _ in range(layout.tp_size)]
    dist.all_gather(pieces, logits.contiguous(), group=layout.tp_group)
    return torch.cat(pieces, dim=-1)
