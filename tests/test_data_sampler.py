"""GlobalBatchSampler: each sample once per epoch over the ranks, seeded order, and exact resume."""

from __future__ import annotations

import logging

import pytest
import torch

from nemo_aligner.data.sampler import GlobalBatchSampler

N, G, DP, SEED = 22, 4, 2, 5  # 5 global batches per epoch, 2 samples dropped


def _sampler(rank: int, seed: int = SEED, shuffle: bool = True) -> GlobalBatchSampler:
    return GlobalBatchSampler(N, global_batch_size=G, dp_rank=rank, dp_size=DP, seed=seed, shuffle=shuffle)


def _stream(sampler: GlobalBatchSampler, batches: int) -> list[list[int]]:
    return [sampler.next_batch() for _ in range(batches)]


def test_each_sample_once_per_epoch_across_ranks():
    samplers = [_sampler(r) for r in range(DP)]
    assert samplers[0].batches_per_epoch == 5 and samplers[0].samples_per_epoch == 20
    for epoch in range(3):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        assert all(s.epoch == epoch for s in samplers)
        shares = [list(s.epoch_batches()) for s in samplers]
        assert [len(b) for b in shares] == [5, 5]
        joined = [i for b in range(5) for r in range(DP) for i in shares[r][b]]  # rank 0's share, then rank 1's
        assert joined == perm[:20]
        assert len(set(joined)) == 20
    assert all(s.epoch == 3 and s.consumed_samples == 60 for s in samplers)


def test_order_changes_per_epoch_and_is_fixed_by_the_seed():
    a, b, other = _sampler(0), _sampler(0), _sampler(0, seed=SEED + 100)
    stream = _stream(a, 10)
    assert stream == _stream(b, 10)
    assert stream != _stream(other, 10)
    assert stream[:5] != stream[5:]  # epoch 0 vs epoch 1


def test_without_shuffle_epochs_follow_dataset_order():
    sampler = _sampler(1, shuffle=False)
    assert _stream(sampler, 6) == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19], [2, 3]]


@pytest.mark.parametrize("rank", range(DP))
def test_resume_from_every_position_matches_the_uninterrupted_stream(rank):
    total = 3 * 5
    expected = _stream(_sampler(rank), total)
    for k in range(total + 1):
        first = _sampler(rank)
        head = _stream(first, k)
        state = first.state_dict()
        assert state == {"consumed_samples": k * G}
        resumed = _sampler(rank)
        resumed.load_state_dict(state)
        assert resumed.consumed_samples == k * G and resumed.epoch == k // 5
        assert head + _stream(resumed, total - k) == expected


def test_epoch_loop_stops_mid_epoch_and_resumes():
    expected = _stream(_sampler(0), 15)
    first = _sampler(0)
    taken = []
    for indices in first.epoch_batches():
        taken.append(indices)
        if len(taken) == 3:
            break  # a trainer that hit max_steps, or checkpoints here and is killed
    resumed = _sampler(0)
    resumed.load_state_dict(first.state_dict())
    for _ in range(resumed.epoch, 3):
        taken.extend(resumed.epoch_batches())
    assert taken == expected


def test_construction_logs_the_epoch_size(caplog):
    with caplog.at_level(logging.INFO, logger="nemo_aligner.data.sampler"):
        _sampler(0)
    assert "22 samples, 5 global batches of 4 per epoch (20 samples per epoch, 2 dropped)" in caplog.text


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(num_samples=3, global_batch_size=4, dp_rank=0, dp_size=2), "fewer than one global batch"),
    (dict(num_samples=10, global_batch_size=5, dp_rank=0, dp_size=2), "multiple of the data-parallel size 2"),
    (dict(num_samples=10, global_batch_size=4, dp_rank=2, dp_size=2), "dp_rank=2 is outside"),
])
def test_invalid_sizes_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlobalBatchSampler(seed=0, **kwargs)


def test_state_from_another_global_batch_size_is_rejected():
    with pytest.raises(ValueError, match="consumed_samples=6 is not a non-negative multiple of global_batch_size=4"):
        _sampler(0).load_state_dict({"consumed_samples": 6})


def test_token_balanced_shares_cover_the_global_batch_evenly_and_resume_exactly():
    """With token counts (packing), each global batch is still split into equal-size shares covering it
    once, the token sums come out closer than the contiguous split's, and a resumed sampler continues alike."""
    gen = torch.Generator().manual_seed(0)
    tokens = (64 * torch.exp(torch.rand(40, generator=gen) * 3.4)).long().tolist()  # log-uniform 64 .. ~1900
    make = lambda rank, counts: GlobalBatchSampler(40, global_batch_size=8, dp_rank=rank, dp_size=4, seed=1,  # noqa: E731
                                                   token_counts=tokens, balance_ranks=counts is not None)
    balanced, contiguous = [make(r, tokens) for r in range(4)], [make(r, None) for r in range(4)]
    for _ in range(5):
        shares = [s.next_batch() for s in balanced]
        plain = [s.next_batch() for s in contiguous]
        assert sorted(i for share in shares for i in share) == sorted(i for share in plain for i in share)
        assert all(len(share) == 2 for share in shares)
        spread = lambda parts: max(sum(tokens[i] for i in p) for p in parts) / min(sum(tokens[i] for i in p) for p in parts)  # noqa: E731
        assert spread(shares) <= spread(plain)
        sums = [sum(tokens[i] for i in share) for share in shares]
        assert balanced[0].token_imbalance == pytest.approx(max(sums) / (sum(sums) / 4) - 1)
    assert contiguous[0].token_imbalance is None
    resumed = make(2, tokens)
    resumed.load_state_dict({"consumed_samples": 16})
    fresh = make(2, tokens)
    _stream(fresh, 2)
    assert _stream(resumed, 6) == _stream(fresh, 6)


def test_group_by_length_keeps_each_sample_once_per_epoch_and_cuts_the_padding():
    gen = torch.Generator().manual_seed(3)
    tokens = (64 * torch.exp(torch.rand(400, generator=gen) * 3.4)).long().tolist()
    make = lambda rank, grouped: GlobalBatchSampler(400, global_batch_size=8, dp_rank=rank, dp_size=2, seed=1,  # noqa: E731
                                                    token_counts=tokens, group_by_length=grouped)
    padding = {}
    for grouped in (False, True):
        samplers = [make(r, grouped) for r in range(2)]
        seen, padded, real = [], 0, 0
        for _ in range(samplers[0].batches_per_epoch):
            shares = [s.next_batch() for s in samplers]
            for share in shares:  # each rank pads its share to its longest sample
                padded += max(tokens[i] for i in share) * len(share)
                real += sum(tokens[i] for i in share)
                seen += share
        assert sorted(seen) == list(range(400))
        padding[grouped] = 1 - real / padded
    assert padding[True] < padding[False] / 3
    resumed, fresh = make(1, True), make(1, True)
    resumed.load_state_dict({"consumed_samples": 80})
    _stream(fresh, 10)
    assert _stream(resumed, 60) == _stream(fresh, 60)  # across the epoch boundary too


def test_grouping_and_balancing_need_the_token_counts():
    with pytest.raises(ValueError, match="need token_counts, one per sample"):
        GlobalBatchSampler(N, global_batch_size=G, dp_rank=0, dp_size=DP, seed=0, group_by_length=True)


def test_a_ranks_share_is_ordered_into_token_balanced_micro_batches():
    """With micro_batch_size, each rank's share comes in an order whose consecutive micro-batches carry
    closer token sums than the share's own order; the share's samples, and a resume, are unchanged."""
    gen = torch.Generator().manual_seed(4)
    tokens = (64 * torch.exp(torch.rand(96, generator=gen) * 3.4)).long().tolist()
    make = lambda micro: GlobalBatchSampler(96, global_batch_size=32, dp_rank=1, dp_size=2, seed=2,  # noqa: E731
                                            token_counts=tokens, balance_ranks=True, micro_batch_size=micro)
    spread = lambda share: (lambda sums: max(sums) / min(sums))(  # noqa: E731
        [sum(tokens[i] for i in share[k:k + 4]) for k in range(0, len(share), 4)])
    grouped, plain = make(4), make(None)
    for _ in range(3):
        share, reference = grouped.next_batch(), plain.next_batch()
        assert sorted(share) == sorted(reference) and len(share) == 16
        assert spread(share) <= spread(reference)
    resumed = make(4)
    resumed.load_state_dict({"consumed_samples": 32})
    fresh = make(4)
    fresh.next_batch()
    assert _stream(resumed, 4) == _stream(fresh, 4)


def test_spin_training_batches_are_balanced_as_pairs_of_sequences_per_micro_batch(tmp_path) -> None:
    """SPIN's training loader (uncollated SFT examples, each trained as the SFT response and a generation)
    hands the sampler each example's tokens as two sequences of the SFT response's length, and the
    micro-batch size, so packing balances ranks and micro-batches; validation rows are one sequence each."""
    from helpers import TINY_MODEL_DIR, write_sft
    from transformers import AutoTokenizer

    from nemo_aligner.config.schema import DataLoadingConfig
    from nemo_aligner.data.builders import build_sft_loader
    from nemo_aligner.types import DataParallel

    path = write_sft(str(tmp_path / "sft.jsonl"), 16)
    common = dict(tokenizer=AutoTokenizer.from_pretrained(TINY_MODEL_DIR), data=DataLoadingConfig(packing=True),
                  max_seq_length=64, global_batch_size=8, data_parallel=DataParallel(rank=0, size=1), response_budget=0,
                  shuffle=True)
    train = build_sft_loader(path, collate=False, micro_batch_size=2, **common)
    val = build_sft_loader(path, collate=True, micro_batch_size=2, **common)
    for loader, sequences in ((train, 2), (val, 1)):
        expected = [sequences * (e["prompt_ids"].numel() + e["response_ids"].numel()) for e in loader.dataset]
        assert loader.sampler._token_counts == expected and loader.sampler._micro_batch_size == 2
