"""Reference strategies: the precomputed values equal the reference computed directly; the cache is
reused when nothing changed and invalidated when the data, the tokenizer or the weights change, and
a corrupt cache is reported and recomputed, never used. (Strategy-against-swap agreement under DP=2
and TP=2 is in tests/test_layouts.py; across a resume in tests/test_dpo_trainer.py.)"""

from __future__ import annotations

import functools
import logging
import os

import pytest
import torch
from transformers import AutoTokenizer

from helpers import FP32, TINY_MODEL_DIR, pretrained, write_pairs
from nemo_aligner.config.dpo import DPOLossConfig, DPOModelConfig
from nemo_aligner.config.schema import OptimConfig, ReferenceConfig, ReferenceStrategy
from nemo_aligner.data.collate import pair_collate
from nemo_aligner.data.preference import PreferenceDataset
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.reference import PrecomputedReference, WeightCopyReference
from nemo_aligner.types import LengthPolicy


def _model(model_dir: str, strategy: ReferenceStrategy) -> GPTDPOModel:
    cfg = DPOModelConfig(micro_batch_size=2, global_batch_size=4, encoder_seq_length=32, optim=OptimConfig(lr=1e-2),
                         dpo=DPOLossConfig(log_prob_forward_micro_batch_size=2, reference=ReferenceConfig(strategy=strategy)))
    return GPTDPOModel(cfg, pretrained(model_dir), FP32)


def _dataset(path: str, tokenizer_dir: str, max_seq_length: int = 32) -> PreferenceDataset:
    return PreferenceDataset(path, AutoTokenizer.from_pretrained(tokenizer_dir), max_seq_length=max_seq_length,
                             length_policy=LengthPolicy.truncate_prompt_left, default_chosen_reward=1.0,
                             default_rejected_reward=0.0)


def _attached(dataset: PreferenceDataset) -> torch.Tensor:
    return torch.tensor([[dataset[i]["chosen_ref_logps"], dataset[i]["rejected_ref_logps"]] for i in range(len(dataset))])


def test_precomputed_values_equal_the_reference_and_the_cache_follows_data_tokenizer_and_weights(
        llama_dir: str, tmp_path, caplog) -> None:
    model = _model(llama_dir, ReferenceStrategy.precomputed)
    reference = model.reference
    assert isinstance(reference, PrecomputedReference)
    cache = str(tmp_path / "cache")
    collate = functools.partial(pair_collate, pad_token_id=model.tokenizer.pad_token_id)
    precompute = functools.partial(reference.precompute_into, name="train", cache_dir=cache, pairs_per_forward=3,
                                   collate=collate, score=model.sequence_logps)
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 7)
    data = _dataset(pairs, llama_dir)
    with caplog.at_level(logging.INFO, logger="nemo_aligner.reference.precomputed"):
        precompute(data)
    assert "computed and cached" in caplog.text
    values = _attached(data)
    direct = model.sequence_logps(collate([data[i] for i in range(len(data))]))  # the weights are still the reference's
    torch.testing.assert_close(values.flatten(), direct.float().cpu(), atol=1e-5, rtol=0)
    assert len(os.listdir(cache)) == 1

    again = _dataset(pairs, llama_dir)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nemo_aligner.reference.precomputed"):
        precompute(again)
    assert "read from the cache" in caplog.text and torch.equal(_attached(again), values)

    precompute(_dataset(write_pairs(str(tmp_path / "other.jsonl"), 7, seed=1), llama_dir))  # other data
    precompute(_dataset(pairs, TINY_MODEL_DIR))  # another tokenizer: other token ids
    precompute(_dataset(pairs, llama_dir, max_seq_length=5))  # prompts cut by the length policy
    assert len(os.listdir(cache)) == 4
    with torch.no_grad():  # other weights
        next(model.engine.module.parameters()).add_(0.1)
    precompute(_dataset(pairs, llama_dir))
    assert len(os.listdir(cache)) == 5


def test_a_corrupt_cache_is_reported_and_recomputed(llama_dir: str, tmp_path, caplog) -> None:
    model = _model(llama_dir, ReferenceStrategy.precomputed)
    cache = str(tmp_path / "cache")
    collate = functools.partial(pair_collate, pad_token_id=model.tokenizer.pad_token_id)
    precompute = functools.partial(model.reference.precompute_into, name="train", cache_dir=cache, pairs_per_forward=4,
                                   collate=collate, score=model.sequence_logps)
    pairs = write_pairs(str(tmp_path / "pairs.jsonl"), 5)
    first = _dataset(pairs, llama_dir)
    precompute(first)
    (path,) = [os.path.join(cache, name) for name in os.listdir(cache)]
    stored = torch.load(path, weights_only=True)
    stored["logps"][0, 0] += 1.0  # the values no longer match their checksum
    torch.save(stored, path)
    with caplog.at_level(logging.WARNING):
        second = _dataset(pairs, llama_dir)
        precompute(second)
    assert "does not match its key, size or checksum" in caplog.text
    torch.testing.assert_close(_attached(second), _attached(first), atol=0, rtol=0)
    with open(path, "wb") as f:
        f.write(b"torn")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        precompute(_dataset(pairs, llama_dir))
    assert "is unreadable" in caplog.text


def test_per_token_values_need_a_strategy_that_holds_weights(llama_dir: str, tmp_path) -> None:
    precomputed = _model(llama_dir, ReferenceStrategy.precomputed)
    data = _dataset(write_pairs(str(tmp_path / "p.jsonl"), 2), llama_dir)
    batch = pair_collate([data[0], data[1]], pad_token_id=0)
    with pytest.raises(RuntimeError, match="carries no precomputed reference log-probs"):
        precomputed.loss_and_metrics(batch, forward_only=True)
    with pytest.raises(RuntimeError, match="choose the resident or swap"):
        precomputed.reference_logprobs(batch)
    resident = _model(llama_dir, ReferenceStrategy.resident)
    assert isinstance(resident.reference, WeightCopyReference) and resident.reference.name == "resident"
    swap = _model(llama_dir, ReferenceStrategy.swap)
    torch.testing.assert_close(resident.reference_logprobs(batch), swap.reference_logprobs(batch), atol=0, rtol=0)
