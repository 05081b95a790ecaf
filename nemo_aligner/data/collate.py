"""Collate examples into batches: preference pairs and SFT examples right-padded for training, prompts
left-padded for generation.

Preference pairs follow the pair layout of nemo_aligner/types.py (two rows per pair, interleaved).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from nemo_aligner.types import PAIR_SIDES, pair_sides

TokenIds = Sequence[int] | torch.Tensor
"""Token ids: a list of ints or a 1-D integer tensor."""


def pair_collate(examples: Sequence[Mapping[str, Any]], *, pad_token_id: int,
                       pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Stacks preference pairs into the pair layout (nemo_aligner/types.py), right-padded.

    Args:
        examples: P pairs, as PreferenceDataset items (or built by SPIN from generations):
            prompt_ids [P_i], chosen_ids, rejected_ids (lists of ints or 1-D integer tensors; each
            response ends with its EOS, and may be that EOS alone), chosen_reward, rejected_reward
            (floats).
        pad_token_id: the id written into padding positions (masked out everywhere).
        pad_to_multiple_of: T is rounded up to a multiple of this (e.g. 8 for tensor cores, or the
            tensor/context-parallel size).

    Returns:
        input_ids [2P, T] int64: prompt + response, then pad_token_id;
        attention_mask [2P, T] int64: 1 on real tokens, 0 on padding;
        loss_mask [2P, T] float32: 1 on response tokens (the EOS included), 0 on prompt and padding;
        rewards [2P] float32: chosen_reward, rejected_reward, interleaved like the rows;
        ref_logps [2P] float32: chosen_ref_logps, rejected_ref_logps, the same way, when every
            example carries them (precomputed reference log-probs).
        T is the longest row rounded up to a multiple of pad_to_multiple_of.

    Raises:
        ValueError: no examples, pad_to_multiple_of < 1, ids that are not 1-D, or an empty response.
    """
    rows: list[tuple[list[int], int]] = []
    rewards: list[float] = []
    for example in examples:
        for side, response_ids, reward in pair_sides(example):
            rows.append(_row(example["prompt_ids"], response_ids, side))
            rewards.append(float(reward))
    batch = _right_padded(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                          caller="pair_collate")
    batch["rewards"] = torch.tensor(rewards, dtype=torch.float32)
    if examples and all("chosen_ref_logps" in example for example in examples):
        batch["ref_logps"] = torch.tensor([example[f"{side}_ref_logps"] for example in examples for side in PAIR_SIDES],
                                          dtype=torch.float32)
    return batch


def sft_collate(examples: Sequence[Mapping[str, Any]], *, pad_token_id: int,
                pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Stacks prompt + response examples, one row each, right-padded.

    Args:
        examples: B examples, as SFTDataset items: prompt_ids [P_i], response_ids [R_i] (lists of
            ints or 1-D integer tensors; the response ends with its EOS).
        pad_token_id: the id written into padding positions (masked out everywhere).
        pad_to_multiple_of: T is rounded up to a multiple of this.

    Returns:
        input_ids [B, T] int64: prompt + response, then pad_token_id;
        attention_mask [B, T] int64: 1 on real tokens, 0 on padding;
        loss_mask [B, T] float32: 1 on response tokens (the EOS included), 0 on prompt and padding.
        T is the longest row rounded up to a multiple of pad_to_multiple_of.

    Raises:
        ValueError: no examples, pad_to_multiple_of < 1, ids that are not 1-D, or an empty response.
    """
    rows = [_row(example["prompt_ids"], example["response_ids"], "response") for example in examples]
    return _right_padded(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, caller="sft_collate")


def prompt_collate(prompt_ids_list: Sequence[TokenIds], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stacks prompts left-padded, so every prompt ends at the last column and generation appends after it.

    Args:
        prompt_ids_list: B prompts, each [P_i] (a list of ints or a 1-D integer tensor), non-empty.
        pad_token_id: the id written into padding positions.

    Returns:
        input_ids [B, P] int64: pad_token_id, then the prompt; P = max P_i;
        attention_mask [B, P] int64: 0 on the left padding, 1 on the prompt.

    Raises:
        ValueError: no prompts, ids that are not 1-D, or an empty prompt.
    """
    if not prompt_ids_list:
        raise ValueError("prompt_collate got no prompts")
    prompts = [_as_list(ids, "prompt_ids") for ids in prompt_ids_list]
    if not all(prompts):
        raise ValueError(f"prompt_collate got an empty prompt (row {[len(p) for p in prompts].index(0)})")
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _row(prompt_ids: TokenIds, response_ids: TokenIds, name: str) -> tuple[list[int], int]:
    """(prompt + response ids, prompt length): one training row before padding."""
    prompt, response = _as_list(prompt_ids, "prompt_ids"), _as_list(response_ids, f"{name}_ids")
    if not response:
        raise ValueError(f"{name}_ids is empty; a response holds at least its EOS")
    return prompt + response, len(prompt)


def _right_padded(rows: Sequence[tuple[list[int], int]], *, pad_token_id: int, pad_to_multiple_of: int,
                  caller: str) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and loss_mask [N, T] of rows given as (ids, prompt length)."""
    if not rows:
        raise ValueError(f"{caller} got no examples")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
    longest = max(len(ids) for ids, _ in rows)
    seq_len = math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), seq_len), dtype=torch.float32)
    for row, (ids, prompt_len) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        loss_mask[row, prompt_len:len(ids)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _as_list(ids: TokenIds, name: str) -> list[int]:
    """Token ids as a list of ints, from a list or a 1-D tensor (on any device)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return list(ids)
