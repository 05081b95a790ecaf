"""Shared types at the bottom of the library: batches, loss functions, generation settings and
results, the over-length policy, the data-parallel position, and the preference-pair row layout.

Everything else imports from here; this module imports nothing of the library.

Batch layout: a batch is a dict of tensors with
  input_ids       [B, T] int64, prompt + response tokens; right-padded for training,
                  left-padded prompts for generation;
  attention_mask  [B, T] int64, 1 on real tokens, 0 on padding;
  loss_mask       [B, T] float, 1 where token t is a trained target (response tokens), else 0
plus algorithm-specific keys (rewards, reference log-probs, ...), which engines pass through.
Per-token log-probs are aligned to targets: logprobs[:, t] = log p(input_ids[:, t+1] | input_ids[:, :t+1]),
shape [B, T-1], computed where loss_mask[:, 1:] is 1 (the scored positions) and 0 elsewhere.

A packed micro-batch (built by nemo_aligner/data/packing.py) also holds its rows laid end to end, which is
what the network runs on; engines return its log-probs unpacked into the [B, T-1] rows all the same:
  packed_input_ids, packed_position_ids, packed_loss_mask  [1, N]: the rows' real tokens one after another,
                  position ids restarting at 0 for every sequence (attention stays within it), then filler;
  packed_cu_seqlens [S+2] int32: where each of the S rows' sequences starts in the packed row, then where
                  the filler starts, then N (transformers' cu_seq_lens for variable-length attention);
  unpack_index    [B, T-1] int64: each row target's index among the N-1 packed targets, -1 past its end.
A packed target whose position id is 0 starts a sequence and is never scored.
Optionally (GPTModel.micro_batches adds it to each micro-batch before any forward is queued):
  scored_index    [K] int64: the flat indices of the K scored targets, in the [B*(T-1)] targets (of the packed
                  row's N-1 when packed), so scoring gathers them without a device-to-host synchronisation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

Batch = Mapping[str, torch.Tensor]


def is_packed(mb: Batch) -> bool:
    """Whether a micro-batch carries a packed layout (see the module docstring)."""
    return "packed_input_ids" in mb


def scored_positions(mb: Batch) -> torch.Tensor:
    """[B, T-1] bool: the targets whose log-probs are computed (loss_mask[:, 1:], else every real token)."""
    mask = mb["loss_mask"] if "loss_mask" in mb else mb["attention_mask"]
    return mask[:, 1:] > 0


def packed_row(mb: Batch) -> dict[str, torch.Tensor]:
    """A packed micro-batch's packed row as a batch of its own: ids, position ids, sequence bounds, and a
    loss mask that never scores a target starting a sequence (its scored_index too, if the batch has one)."""
    row = {"input_ids": mb["packed_input_ids"], "position_ids": mb["packed_position_ids"],
           "loss_mask": mb["packed_loss_mask"] * (mb["packed_position_ids"] > 0), "cu_seqlens": mb["packed_cu_seqlens"]}
    if "scored_index" in mb:
        row["scored_index"] = mb["scored_index"]
    return row


def with_scored_index(mb: Batch) -> dict[str, torch.Tensor]:
    """`mb` plus its scored_index (see the module docstring), computed where `mb` is: call it on the host."""
    targets = scored_positions(packed_row(mb) if is_packed(mb) else mb)
    return {**mb, "scored_index": targets.reshape(-1).nonzero().squeeze(1)}


def unpack_logprobs(packed: torch.Tensor, unpack_index: torch.Tensor) -> torch.Tensor:
    """[1, N-1] packed per-target log-probs -> [B, T-1] per row (0 past each row's end)."""
    return packed.reshape(-1)[unpack_index.clamp(min=0)] * (unpack_index >= 0)

# loss_fn(logprobs [B, T-1] fp32, micro_batch) -> (loss, metrics). The loss is this micro-batch's
# share of the *global* loss (already divided by the global normaliser), so summing over micro-
# batches and data-parallel ranks gives the global mean. Metrics are sums in the same sense.
LossFn = Callable[[torch.Tensor, Batch], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


# This rank's local pieces of the distinct parameters, by name (an engine's weight buffers).
Weights = dict[str, torch.Tensor]


def check_same_weights(expected: Weights, given: Weights, what: str) -> None:
    """Raise unless `given` has exactly `expected`'s names and shapes (KeyError / ValueError naming `what`)."""
    if expected.keys() != given.keys():
        missing, extra = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
        raise KeyError(f"{what} do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, tensor in expected.items():
        if tensor.shape != given[name].shape:
            raise ValueError(f"{what}: {name} has shape {tuple(given[name].shape)}, the model's is {tuple(tensor.shape)}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ValueError naming the config key, its value and what it must be, unless `ok`."""
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid: it must be {allowed}")


@dataclass
class SamplingParams:
    """How the next token is chosen (NeMo-Aligner's `sampling_params` keys); also the config schema."""

    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus sampling

    def __post_init__(self) -> None:
        require(self.temperature > 0, "sampling_params.temperature", self.temperature, "> 0")
        require(self.top_k >= 0, "sampling_params.top_k", self.top_k, ">= 0")
        require(0 < self.top_p <= 1, "sampling_params.top_p", self.top_p, "in (0, 1]")


@dataclass
class LengthParams:
    """How many new tokens are generated (NeMo-Aligner's `length_params` keys); also the config schema."""

    max_length: int = 16  # new tokens at most
    min_length: int = 0  # EOS is suppressed before this many new tokens

    def __post_init__(self) -> None:
        require(self.max_length >= 1, "length_params.max_length", self.max_length, ">= 1")
        require(0 <= self.min_length <= self.max_length, "length_params.min_length", self.min_length,
                f"in [0, max_length={self.max_length}]")


@dataclass
class Generations:
    """Output of generate: prompts followed by responses, left-padded prompts kept as given.

    tokens [B, P+N]; response_lengths [B] (new tokens up to and including EOS);
    prompt_lengths [B] (real prompt tokens, without left padding).
    """

    tokens: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor


class LengthPolicy(enum.Enum):
    """How an example whose prompt + longest response exceeds max_seq_length is handled."""

    truncate_prompt_left = "truncate_prompt_left"  # keep the prompt's last tokens (and a leading BOS)
    drop = "drop"  # leave the example out


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks: it reads share `rank` of `size` of every batch."""

    rank: int
    size: int


# ---- preference pairs: the one place that knows a pair is two rows ------------------------------
# A batch of P pairs has 2P rows, interleaved: row 2i is pair i's prompt + chosen (SPIN: actual)
# response, row 2i + 1 its prompt + rejected (SPIN: generated) response. Any contiguous split into
# an even number of rows (micro-batches, data-parallel shares) keeps every pair whole.

ROWS_PER_PAIR = 2


def chosen_rows(rows: torch.Tensor) -> torch.Tensor:
    """The chosen rows [P, ...] of a pair-layout tensor [2P, ...]."""
    return rows[0::ROWS_PER_PAIR]


def rejected_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rejected rows [P, ...] of a pair-layout tensor [2P, ...]."""
    return rows[1::ROWS_PER_PAIR]


def pair_rows(per_pair: torch.Tensor) -> torch.Tensor:
    """A per-pair tensor [P, ...] as a pair-layout one [2P, ...]: each pair's value on both of its rows."""
    return per_pair.repeat_interleave(ROWS_PER_PAIR, dim=0)


PAIR_SIDES = ("chosen", "rejected")  # in row order


def pair_sides(pair: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(side, response ids, reward) of one pair's {chosen,rejected}_ids / _reward, in row order."""
    return [(side, pair[f"{side}_ids"], pair[f"{side}_reward"]) for side in PAIR_SIDES]
