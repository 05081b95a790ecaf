"""Build the data loaders an entry script needs from its `model.data` section and plain values."""

from __future__ import annotations

import functools
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from nemo_aligner.config.dpo import PreferenceDataConfig
from nemo_aligner.config.schema import DataLoadingConfig
from nemo_aligner.data.collate import pair_collate, sft_collate
from nemo_aligner.data.loader import StepDataLoader
from nemo_aligner.data.preference import PreferenceDataset
from nemo_aligner.data.prompts import PromptDataset
from nemo_aligner.data.sampler import GlobalBatchSampler
from nemo_aligner.data.sft import SFTDataset
from nemo_aligner.types import DataParallel


def _loader(dataset: Any, *, global_batch_size: int, data_parallel: DataParallel, data: DataLoadingConfig, shuffle: bool,
            collate: Callable[[list[Any]], Any], sequences: tuple[str, ...],
            micro_batch_size: int | None = None) -> StepDataLoader:
    """With packing, global batches are split over the ranks by tokens, so packed rows are as long on every
    rank, and given `micro_batch_size` each rank's micro-batches too; with group_by_length, global batches
    hold examples of similar length. An example's tokens: the prompt once per sequence it is trained as,
    plus each sequence's response, `sequences` naming the response field of each (none: the prompt alone)."""
    balance_ranks = data.packing and (data_parallel.size > 1 or micro_batch_size is not None)
    token_counts = None
    if balance_ranks or data.group_by_length:
        token_counts = [_tokens(dataset[i], sequences) for i in range(len(dataset))]
    sampler = GlobalBatchSampler(len(dataset), global_batch_size=global_batch_size, dp_rank=data_parallel.rank,
                                 dp_size=data_parallel.size, seed=data.seed, shuffle=shuffle, token_counts=token_counts,
                                 balance_ranks=balance_ranks, micro_batch_size=micro_batch_size,
                                 group_by_length=data.group_by_length)
    return StepDataLoader(dataset, sampler, collate)


def _tokens(example: dict[str, Any], sequences: tuple[str, ...]) -> int:
    return example["prompt_ids"].numel() * max(len(sequences), 1) + sum(example[f].numel() for f in sequences)


def build_preference_loader(path: str, tokenizer: PreTrainedTokenizerBase, data: PreferenceDataConfig, *,
                            max_seq_length: int, global_batch_size: int, data_parallel: DataParallel,
                            shuffle: bool, micro_batch_size: int | None = None) -> StepDataLoader:
    """Preference pairs from `path` (validated whole, up front) in global batches of
    `global_batch_size` pairs, collated in the pair layout; with packing, `micro_batch_size` (pairs)
    lets each rank's micro-batches carry about equal tokens."""
    dataset = PreferenceDataset(path, tokenizer, max_seq_length=max_seq_length, length_policy=data.length_policy,
                                default_chosen_reward=data.default_chosen_reward,
                                default_rejected_reward=data.default_rejected_reward)
    collate = functools.partial(pair_collate, pad_token_id=tokenizer.pad_token_id,
                                pad_to_multiple_of=data.pad_to_multiple_of)
    return _loader(dataset, global_batch_size=global_batch_size, data_parallel=data_parallel, data=data,
                   shuffle=shuffle, collate=collate, sequences=("chosen_ids", "rejected_ids"),
                   micro_batch_size=micro_batch_size)


def build_sft_loader(path: str, tokenizer: PreTrainedTokenizerBase, data: DataLoadingConfig, *, max_seq_length: int,
                     global_batch_size: int, data_parallel: DataParallel, response_budget: int, shuffle: bool,
                     collate: bool, micro_batch_size: int | None = None) -> StepDataLoader:
    """SFT examples from `path` (validated whole, up front) in global batches; `response_budget`
    reserves room for generations. With `collate` a batch is right-padded prompt + response rows,
    otherwise the examples themselves (a list of {prompt_ids, response_ids}, SPIN's training input:
    each becomes a pair of sequences, the SFT response and a generation, which packing balances as
    two sequences of the SFT response's length; with `micro_batch_size`, per micro-batch too)."""
    dataset = SFTDataset(path, tokenizer, max_seq_length=max_seq_length, length_policy=data.length_policy,
                         response_budget=response_budget)
    rows = functools.partial(sft_collate, pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=data.pad_to_multiple_of)
    # SPIN trains an example as its SFT response and a generation, estimated at the SFT response's length
    sequences = ("response_ids",) if collate else ("response_ids", "response_ids")
    return _loader(dataset, global_batch_size=global_batch_size, data_parallel=data_parallel, data=data,
                   shuffle=shuffle, collate=rows if collate else list, sequences=sequences,
                   micro_batch_size=micro_batch_size)


def build_prompt_loader(path: str, tokenizer: PreTrainedTokenizerBase, data: DataLoadingConfig, *, max_seq_length: int,
                        prompts_per_step: int, data_parallel: DataParallel, response_budget: int,
                        shuffle: bool) -> StepDataLoader:
    """Prompts from `path` (validated whole, up front), `prompts_per_step` per global batch,
    handed over uncollated (a list of {prompt_ids, prompt_text})."""
    dataset = PromptDataset(path, tokenizer, max_seq_length=max_seq_length, length_policy=data.length_policy,
                            response_budget=response_budget)
    return _loader(dataset, global_batch_size=prompts_per_step, data_parallel=data_parallel, data=data,
                   shuffle=shuffle, collate=list, sequences=())
