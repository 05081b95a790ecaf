"""Build the data loaders an entry script needs from its `model.data` config."""

from __future__ import annotations

import functools
from typing import Any, Callable

from nemo_aligner.config.dpo import PreferenceDataConfig
from nemo_aligner.config.rs import PromptDataConfig
from nemo_aligner.config.spin import SFTDataConfig
from nemo_aligner.data.collate import dpo_custom_collate, sft_collate
from nemo_aligner.data.loader import StepDataLoader
from nemo_aligner.data.preference import PreferenceDataset
from nemo_aligner.data.prompts import PromptDataset
from nemo_aligner.data.sampler import GlobalBatchSampler
from nemo_aligner.data.sft import SFTDataset
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel


def _loader(dataset: Any, policy: GPTModel, *, global_batch_size: int, seed: int, shuffle: bool,
            collate: Callable[[list[Any]], Any]) -> StepDataLoader:
    sampler = GlobalBatchSampler(len(dataset), global_batch_size=global_batch_size, dp_rank=policy.dp_rank,
                                 dp_size=policy.dims.dp, seed=seed, shuffle=shuffle)
    return StepDataLoader(dataset, sampler, collate)


def build_preference_loader(path: str, policy: GPTModel, data: PreferenceDataConfig, *, shuffle: bool) -> StepDataLoader:
    """Preference pairs from `path` (validated whole, up front) in global batches of pairs."""
    tokenizer = policy.tokenizer
    dataset = PreferenceDataset(path, tokenizer, max_seq_length=policy.cfg.encoder_seq_length,
                                length_policy=data.length_policy, default_chosen_reward=data.default_chosen_reward,
                                default_rejected_reward=data.default_rejected_reward)
    collate = functools.partial(dpo_custom_collate, pad_token_id=tokenizer.pad_token_id,
                                pad_to_multiple_of=data.pad_to_multiple_of)
    return _loader(dataset, policy, global_batch_size=policy.cfg.global_batch_size, seed=data.seed, shuffle=shuffle,
                   collate=collate)


def build_sft_loader(path: str, policy: GPTModel, data: SFTDataConfig, *, response_budget: int,
                     shuffle: bool) -> StepDataLoader:
    """SFT examples from `path` (validated whole, up front) in global batches, collated as
    right-padded prompt + response rows; `response_budget` reserves room for generations."""
    tokenizer = policy.tokenizer
    dataset = SFTDataset(path, tokenizer, max_seq_length=policy.cfg.encoder_seq_length,
                         length_policy=data.length_policy, response_budget=response_budget)
    collate = functools.partial(sft_collate, pad_token_id=tokenizer.pad_token_id,
                                pad_to_multiple_of=data.pad_to_multiple_of)
    return _loader(dataset, policy, global_batch_size=policy.cfg.global_batch_size, seed=data.seed, shuffle=shuffle,
                   collate=collate)


def build_prompt_loader(path: str, policy: GPTModel, data: PromptDataConfig, *, prompts_per_step: int,
                        response_budget: int, shuffle: bool) -> StepDataLoader:
    """Prompts from `path` (validated whole, up front), `prompts_per_step` per global batch,
    handed over uncollated (a list of {prompt_ids, prompt_text})."""
    dataset = PromptDataset(path, policy.tokenizer, max_seq_length=policy.cfg.encoder_seq_length,
                            length_policy=data.length_policy, response_budget=response_budget)
    return _loader(dataset, policy, global_batch_size=prompts_per_step, seed=data.seed, shuffle=shuffle, collate=list)
