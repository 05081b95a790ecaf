"""Collate preference pairs into one right-padded training batch in THE pair layout.

Pair layout (defined here, used everywhere): a batch of P pairs has 2P rows, interleaved:
    row 2i     = pair i's prompt + chosen response,
    row 2i + 1 = pair i's prompt + rejected response.
So ``x[0::2]`` is every chosen row and ``x[1::2]`` every rejected row, and any contiguous split of
the batch into an even number of rows (micro-batches, data-parallel shares) keeps each pair whole.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch


def dpo_custom_collate(examples: Sequence[Mapping[str, Any]], *, pad_token_id: int,
                       pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Stacks preference pairs into the interleaved pair layout, right-padded.

    Args:
        examples: P pairs, as PreferenceDataset items: prompt_ids [P_i], chosen_ids, rejected_ids
            (lists of ints or 1-D integer tensors; each response ends with its EOS), chosen_reward,
            rejected_reward (floats).
        pad_token_id: the id written into padding positions (masked out everywhere).
        pad_to_multiple_of: T is rounded up to a multiple of this (e.g. 8 for tensor cores, or the
            tensor/context-parallel size).

    Returns:
        input_ids [2P, T] int64: prompt + response, then pad_token_id;
        attention_mask [2P, T] int64: 1 on real tokens, 0 on padding;
        loss_mask [2P, T] float32: 1 on response tokens (the EOS included), 0 on prompt and padding;
        rewards [2P] float32: chosen_reward, rejected_reward, interleaved like the rows.
        T is the longest row rounded up to a multiple of pad_to_multiple_of.

    Raises:
        ValueError: no examples, or pad_to_multiple_of < 1.
    """
    if not examples:
        raise ValueError("dpo_custom_collate got no examples")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
    rows: list[tuple[list[int], int]] = []  # (ids, prompt length) per row
    rewards: list[float] = []
    for example in examples:
        prompt = _as_list(example["prompt_ids"])
        for side in ("chosen", "rejected"):
            rows.append((prompt + _as_list(example[f"{side}_ids"]), len(prompt)))
            rewards.append(float(example[f"{side}_reward"]))
    longest = max(len(ids) for ids, _ in rows)
    seq_len = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), seq_len), dtype=torch.float32)
    for row, (ids, prompt_len) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, prompt_len:len(ids)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "rewards": torch.tensor(rewards, dtype=torch.float32)}


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Token ids as a list of ints, from a list or a 1-D tensor."""
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
