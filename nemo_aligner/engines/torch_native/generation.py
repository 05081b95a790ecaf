"""Batched autoregressive generation over left-padded prompts, against a static (pre-allocated) KV cache.

The prompt is prefilled eagerly with SDPA; every later step feeds one token per row. A `Decoder` keeps
its static cache across calls (one per batch size and rounded-up length, reset in place), so on CUDA
the one-token step, compiled with torch.compile(mode="reduce-overhead"), is captured once as a CUDA
graph and replayed each step: the step costs the device's time, not the host's launching of every
kernel of every layer. Eager decoding (CPU, tensor or FSDP parallel layouts) runs the same code.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import StaticCache

from nemo_aligner.types import Generations, LengthParams, SamplingParams

# Decode steps between checks that every row has finished: each check reads a flag back from the device
# (and all-reduces it over data-parallel ranks), which stalls the host's launching of the next steps.
# Steps past the last row's EOS only add padding, which is cut off, so the output does not depend on it.
FINISHED_CHECK_INTERVAL = 8
# Static caches are sized in multiples of this many positions, so generations whose prompt + response
# lengths round to the same size share one cache and one compiled (CUDA-graphed) decode step.
CACHE_LENGTH_MULTIPLE = 128


class Decoder:
    """A module's forwards for generation: the prefill and the one-token decode step, against a static KV
    cache it keeps for the next call of the same shape. With `cuda_graphs`, the decode step is compiled
    with torch.compile(mode="reduce-overhead") (CUDA graphs; one capture per batch size and cache size)."""

    def __init__(self, module: nn.Module, *, cuda_graphs: bool) -> None:
        self.module = module
        self.cuda_graphs = cuda_graphs
        self._cache_argument = cache_argument(module)
        self._cache: StaticCache | None = None
        self._shape: tuple[int, int] | None = None
        self._step = (torch.compile(_forward_last_logits, mode="reduce-overhead", dynamic=False) if cuda_graphs
                      else _forward_last_logits)

    def cache(self, rows: int, positions: int) -> tuple[StaticCache, int]:
        """A static cache for `rows` x at least `positions` positions, and its length: the previous one,
        emptied, if it has the same shape (its tensors keep their addresses, which a captured graph reads)."""
        shape = (rows, -(-positions // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE)
        if self._cache is not None and self._shape == shape:
            self._cache.reset()
        else:
            self._cache, self._shape = StaticCache(config=self.module.config, max_cache_len=shape[1]), shape
        return self._cache, shape[1]

    def prefill(self, cache: StaticCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """[B, V] fp32 logits after the prompts (eager: prompts vary in length)."""
        with _eager():
            return _forward_last_logits(self.module, self._cache_argument, cache, input_ids, attention_mask, position_ids)

    def step(self, cache: StaticCache, tokens: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor) -> torch.Tensor:
        """[B, V] fp32 logits after one more token per row; `attention_mask` spans the whole cache."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
            return self._step(self.module, self._cache_argument, cache, tokens, attention_mask, position_ids)
        with _eager():
            return self._step(self.module, self._cache_argument, cache, tokens, attention_mask, position_ids)


def _forward_last_logits(module: nn.Module, cache_arg: str, cache: StaticCache, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 logits_to_keep=1, **{cache_arg: cache})
    return _last_logits(out.logits)


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Compiled decoder layers run eagerly: prompts of every length and eager one-token steps would only
    add compiled graphs."""
    with torch.compiler.set_stance("force_eager"):
        yield


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
    decoder: Decoder | None = None,
) -> Generations:
    """Extend left-padded prompts `input_ids` [B, P] until EOS or `length.max_length` new tokens.

    Every data-parallel rank runs the same number of forward passes (FSDP gathers weights in
    each), so a rank whose rows all finished keeps stepping until every rank has; whether they have
    is checked every FINISHED_CHECK_INTERVAL steps. Finished rows are filled with `pad_token_id`, and
    the responses end with the longest one. `decoder` (default: an eager one for `module`) runs the forwards.
    """
    decoder = decoder or Decoder(module, cuda_graphs=False)
    batch, prompt = input_ids.shape
    cache, cache_length = decoder.cache(batch, prompt + length.max_length)
    # the mask spans the whole cache: prompt padding 0, every later position 1 (causality hides the future)
    full_mask = torch.ones(batch, cache_length, dtype=attention_mask.dtype, device=attention_mask.device)
    full_mask[:, :prompt] = attention_mask
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    response_lengths = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    logits = decoder.prefill(cache, input_ids, full_mask, position_ids)
    position_ids = position_ids[:, -1:]
    for step in range(length.max_length):
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
        position_ids = position_ids + 1
        logits = decoder.step(cache, token[:, None], full_mask, position_ids)
    responses = torch.stack(new_tokens, dim=1) if new_tokens else input_ids[:, :0]
    longest = int(_longest(response_lengths, dp_group))
    responses = responses[:, :longest]  # the steps after every rank's last EOS produced only padding
    return Generations(tokens=torch.cat([input_ids, responses], dim=1), prompt_lengths=attention_mask.sum(dim=-1),
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
