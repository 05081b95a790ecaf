"""The narrow interface between GPTModel and an engine that builds and runs the network.

Batch layout (one place, used everywhere): a batch is a dict of tensors with
  input_ids       [B, T] int64, prompt + response tokens; right-padded for training,
                  left-padded prompts for generation;
  attention_mask  [B, T] int64, 1 on real tokens, 0 on padding;
  loss_mask       [B, T] float, 1 where token t is a trained target (response tokens), else 0
plus any algorithm-specific keys (rewards, reference log-probs, ...), which engines pass through.
Per-token log-probs are aligned to targets: logprobs[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1]),
shape [B, T-1]; the matching mask is loss_mask[:, 1:].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch

Batch = Mapping[str, torch.Tensor]

# loss_fn(logprobs [B, T-1] fp32, micro_batch) -> (loss, metrics). The loss is this micro-batch's
# share of the *global* loss (already divided by the global normaliser), so summing over micro-
# batches and data-parallel ranks gives the global mean. Metrics are sums in the same sense.
LossFn = Callable[[torch.Tensor, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen (NeMo-Aligner's sampling_params names)."""

    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus sampling


@dataclass(frozen=True)
class LengthParams:
    """How many tokens are generated (NeMo-Aligner's length_params names)."""

    max_length: int = 64  # new tokens at most
    min_length: int = 0  # EOS is suppressed before this many new tokens


@dataclass
class Generations:
    """Output of generate: prompts followed by responses, left-padded prompts kept as given.

    tokens [B, P+N]; response_lengths [B] (new tokens up to and including EOS);
    prompt_lengths [B] (real prompt tokens, without left padding).
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor


class Engine(Protocol):
    """What GPTModel needs from an engine; algorithms never see it."""

    module: torch.nn.Module

    def forward_backward(self, micro_batches: Sequence[Batch], loss_fn: LossFn, *, forward_only: bool) -> dict[str, torch.Tensor]: ...

    def logprobs(self, batch: Batch) -> torch.Tensor: ...

    def optimizer_step(self) -> tuple[float, float]: ...

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations: ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...

    def export_hf(self, path: str) -> None: ...
