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
import torch._dynamo
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import StaticCache

from nemo_aligner.engines.decoding import FINISHED_CHECK_INTERVAL, sample_next_token
from nemo_aligner.types import Generations, LengthParams, SamplingParams

# With CUDA graphs, static caches are sized in multiples of this many positions, so generations whose
# prompt + response lengths round to the same size share one cache and one captured decode step.
CACHE_LENGTH_MULTIPLE = 128
# A generation whose running rows fall to half of its batch or fewer (seen at a finished check) moves them
# to a cache half as large or smaller, so finished rows stop costing decode work; batches are never cut
# below this many rows, and sizes halve, so few decode graphs are captured.
MIN_COMPACTED_ROWS = 4
# Compiled decode steps dynamo may keep (batch halvings x cache lengths over a run) before it falls back to eager
DECODE_GRAPHS_LIMIT = 64


def cache_length(positions: int) -> int:
    """The static cache length a generation over `positions` positions gets (a multiple of CACHE_LENGTH_MULTIPLE)."""
    return -(-positions // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE


class Decoder:
    """A module's forwards for generation: the prefill and the one-token decode step, against static KV
    caches it keeps for the next call of the same shapes. With `cuda_graphs`, the decode step is compiled
    with torch.compile(mode="reduce-overhead") (CUDA graphs; one capture per batch size and cache size)."""

    def __init__(self, module: nn.Module, *, cuda_graphs: bool) -> None:
        self.module = module
        self.cuda_graphs = cuda_graphs
        self._cache_argument = cache_argument(module)
        self._caches: dict[tuple[int, int], StaticCache] = {}  # by (rows, cache length), of one cache length
        self._step = (torch.compile(_forward_last_logits, mode="reduce-overhead", dynamic=False) if cuda_graphs
                      else _forward_last_logits)
        # with CUDA graphs also the sampling: one fused pass over the [B, V] logits instead of an eager kernel
        # per op (the Gumbel noise's two logs and negations, the add, the argmax: 0.6 ms a step at 256 rows)
        self._sample = torch.compile(sample_next_token, dynamic=False) if cuda_graphs else None
        if cuda_graphs:  # a graph per (rows, cache length, cache object): more than dynamo's default of 8 per code
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_GRAPHS_LIMIT)

    def cache_length(self, positions: int) -> int:
        """The cache length for `positions`: rounded up (cache_length) where a captured graph is reused by
        every generation of the same rounded length, exact where decoding is eager."""
        return cache_length(positions) if self.cuda_graphs else positions

    def cache(self, rows: int, length: int) -> StaticCache:
        """An empty static cache of `rows` x `length` (a cache_length): the one of that shape from before,
        reset in place (its tensors keep their addresses, which a captured graph reads). Caches of other
        lengths are dropped, so memory holds one length's caches (a batch and its compacted halves)."""
        self._caches = {shape: cache for shape, cache in self._caches.items() if shape[1] == length}
        if (rows, length) in self._caches:
            self._caches[rows, length].reset()
        else:
            self._caches[rows, length] = StaticCache(config=self.module.config, max_cache_len=length)
        return self._caches[rows, length]

    def compacted(self, cache: StaticCache, keep: torch.Tensor, length: int) -> StaticCache:
        """A cache of len(keep) rows holding rows `keep` of `cache` (every layer's keys, values and length)."""
        smaller = self.cache(keep.numel(), length)
        for old, new in zip(cache.layers, smaller.layers):
            keys, values = old.keys.index_select(0, keep), old.values.index_select(0, keep)
            if not new.is_initialized:
                new.lazy_initialization(keys, values)
            new.keys.copy_(keys)
            new.values.copy_(values)
            new.cumulative_length.copy_(old.cumulative_length)
            if hasattr(old, "cumulative_length_int"):  # sliding-window layers also count on the host
                new.cumulative_length_int = old.cumulative_length_int
        return smaller

    def sample(self, logits: torch.Tensor, sampling: SamplingParams, uniform: torch.Tensor | None) -> torch.Tensor:
        """sample_next_token, compiled where the decode step is."""
        return (self._sample or sample_next_token)(logits, sampling, uniform)

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
    device = input_ids.device
    length_of_cache = decoder.cache_length(prompt + length.max_length)
    cache = decoder.cache(batch, length_of_cache)
    # the mask spans the whole cache: prompt padding 0, every later position 1 (causality hides the future)
    mask = torch.ones(batch, length_of_cache, dtype=attention_mask.dtype, device=device)
    mask[:, :prompt] = attention_mask
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    # by original row, plus a scratch row (index `batch`, always finished) for a compacted batch's filler rows
    finished = torch.zeros(batch + 1, dtype=torch.bool, device=device)
    finished[batch] = True
    response_lengths = torch.zeros(batch + 1, dtype=torch.long, device=device)
    responses = torch.full((batch + 1, length.max_length), pad_token_id, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # the original row of each row in the decoded batch
    logits = decoder.prefill(cache, input_ids, mask, position_ids)
    position_ids = position_ids[:, -1:]
    for step in range(length.max_length):
        if step < length.min_length:
            logits[:, eos_token_id] = float("-inf")
        done = finished[rows]
        # noise for every original row, so that a row's draw does not depend on which rows remain
        uniform = None if sampling.use_greedy else torch.rand(
            batch + 1, logits.shape[-1], generator=generator, device=device)[rows]
        token = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long),
                            decoder.sample(logits, sampling, uniform))
        response_lengths[rows] += (~done).long()
        finished[rows] = done | (token == eos_token_id)
        responses[rows, step] = token
        if step == length.max_length - 1:
            break
        if (step + 1) % FINISHED_CHECK_INTERVAL == 0:
            running, running_anywhere = _unfinished(finished[:batch], dp_group)
            if running_anywhere == 0:
                break
            if running <= rows.numel() // 2 and rows.numel() > MIN_COMPACTED_ROWS:
                keep = _compaction(finished[rows], rows.numel())
                cache = decoder.compacted(cache, keep, length_of_cache)
                rows = torch.where(finished[rows][keep], batch, rows[keep])
                token, mask, position_ids = token[keep], mask[keep], position_ids[keep]
        position_ids = position_ids + 1
        logits = decoder.step(cache, token[:, None], mask, position_ids)
    response_lengths = response_lengths[:batch]
    longest = int(_longest(response_lengths, dp_group))
    # the steps after every rank's last EOS produced only padding
    return Generations(tokens=torch.cat([input_ids, responses[:batch, :longest]], dim=1),
                       prompt_lengths=attention_mask.sum(dim=-1), response_lengths=response_lengths)


def _compaction(done: torch.Tensor, rows: int) -> torch.Tensor:
    """Which rows of the decoded batch continue: the running ones, in order, then finished ones as filler up
    to the smallest halving of `rows` (not below MIN_COMPACTED_ROWS) that holds them all."""
    running = (~done).nonzero().squeeze(1)
    size = rows
    while size // 2 >= max(running.numel(), MIN_COMPACTED_ROWS):
        size //= 2
    filler = done.nonzero().squeeze(1)[: size - running.numel()]
    return torch.cat([running, filler])


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


def _unfinished(finished: torch.Tensor, dp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """Rows still running on this rank, and on every data-parallel rank together (one host sync)."""
    counts = (~finished).sum().repeat(2)  # [here, everywhere]
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts[1:], group=dp_group)
    local, everywhere = counts.tolist()
    return int(local), int(everywhere)
