"""Preference losses against hand-computed values (plain-Python math) and their gradient signs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nemo_aligner.losses import (
    PREFERENCE_LOSSES,
    PreferencePairs,
    bind_preference_loss,
    get_preference_loss,
    preference_pairs,
    register_preference_loss,
    sequence_nll,
)

DELTA, BETA, GT = [1.0, -0.5], 0.1, [2.0, 0.0]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


EXPECTED = {
    "dpo": [math.log(1 + math.exp(-BETA * d)) for d in DELTA],
    "ipo": [(d - 1 / (2 * BETA)) ** 2 for d in DELTA],  # 16.0, 30.25
    "rpo_sq": [(BETA * d - g) ** 2 for d, g in zip(DELTA, GT)],  # 3.61, 0.0025
    "rpo_bwd_kl": [_kl(_sig(g), _sig(BETA * d)) for d, g in zip(DELTA, GT)],
    "rpo_fwd_kl": [_kl(_sig(BETA * d), _sig(g)) for d, g in zip(DELTA, GT)],
}


def _pairs(chosen: list[float], rejected: list[float], gt: list[float]) -> PreferencePairs:
    """Pairs with the given log-ratios and reward margins (log-probs and lengths are not used by the seed losses)."""
    unused = torch.full((len(gt),), float("nan"), dtype=torch.float64)
    return PreferencePairs(chosen_logratios=torch.tensor(chosen, dtype=torch.float64),
                           rejected_logratios=torch.tensor(rejected, dtype=torch.float64), chosen_logps=unused,
                           rejected_logps=unused, chosen_lengths=unused, rejected_lengths=unused,
                           gt_margin=torch.tensor(gt, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_values(name: str) -> None:
    # Δ = R_chosen − R_rejected with both sides non-zero, so a loss that ignored one side would fail
    loss = get_preference_loss(name)(_pairs([d + 0.25 for d in DELTA], [0.25, 0.25], GT), beta=BETA)
    assert loss.tolist() == pytest.approx(EXPECTED[name], rel=1e-12)


def _grad(name: str, delta: float, gt: float) -> float:
    d = torch.tensor([delta], dtype=torch.float64, requires_grad=True)
    pairs = dataclasses.replace(_pairs([0.0], [0.0], [gt]), chosen_logratios=d)
    get_preference_loss(name)(pairs, beta=BETA).sum().backward()
    return d.grad.item()


def test_gradient_signs() -> None:
    assert _grad("dpo", 3.0, 0.0) < 0 and _grad("dpo", -3.0, 0.0) < 0  # always widen the margin
    assert _grad("ipo", 1.0, 0.0) < 0 < _grad("ipo", 9.0, 0.0)  # pulled toward 1/(2β) = 5
    for name in ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"):  # pulled toward βΔ = g, i.e. Δ = 20 for g = 2
        assert _grad(name, 10.0, 2.0) < 0 < _grad(name, 30.0, 2.0), name
        assert abs(_grad(name, 20.0, 2.0)) < 1e-12, name


def test_registry_rejects_duplicates_and_lists_names() -> None:
    assert {"dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq", "simpo", "orpo", "cpo"} <= set(PREFERENCE_LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        register_preference_loss("dpo")(lambda pairs, *, beta: pairs.margin)
    with pytest.raises(ValueError, match=r"unknown preference loss 'kto'; valid: \[.*'dpo', .*'ipo'"):
        get_preference_loss("kto")


def test_sequence_nll_and_empty_responses() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert sequence_nll(logprobs, mask, average=False).tolist() == [5.0, 0.0]
    assert sequence_nll(logprobs, mask, average=True).tolist() == [2.5, 0.0]


def test_preference_pairs_split_the_pair_layout_rows() -> None:
    # rows: chosen 0, rejected 0, chosen 1, rejected 1 (target-aligned, 3 positions)
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-1.0, -1.0, -1.0], [-4.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    ref_logps = (ref * mask).sum(-1)  # what every reference strategy delivers: Σ_t per row
    pairs = preference_pairs(logprobs, mask, ref_logps=ref_logps, average_log_probs=False, gt_margin=torch.tensor([1.0, 2.0]))
    assert pairs.chosen_logratios.tolist() == [-3.0, 3.0] and pairs.rejected_logratios.tolist() == [1.0, 0.0]
    assert pairs.chosen_logps.tolist() == [-5.0, -3.0] and pairs.rejected_logps.tolist() == [-1.0, -2.0]
    assert pairs.chosen_lengths.tolist() == [2.0, 3.0] and pairs.rejected_lengths.tolist() == [2.0, 1.0]
    assert pairs.margin.tolist() == [-4.0, 3.0] and pairs.gt_margin.tolist() == [1.0, 2.0]
    averaged = preference_pairs(logprobs, mask, ref_logps=ref_logps, average_log_probs=True,
                                gt_margin=torch.tensor([1.0, 2.0]))
    assert averaged.chosen_logratios.tolist() == [-1.5, 1.0] and averaged.rejected_logratios.tolist() == [0.5, 0.0]
    assert averaged.chosen_logps.tolist() == [-5.0, -3.0]  # log-probs stay sums; a loss normalises them itself


def test_binding_checks_the_name_and_the_loss_own_hyper_parameters() -> None:
    assert bind_preference_loss("ipo", {}, key="model.dpo.preference_loss") is PREFERENCE_LOSSES["ipo"]
    with pytest.raises(ValueError, match=r"model.dpo.preference_loss='kto' is invalid: it must be one of \[.*'dpo', .*'ipo'"):
        bind_preference_loss("kto", {}, key="model.dpo.preference_loss")
    with pytest.raises(ValueError, match=r"model.dpo.preference_loss='dpo': hyper-parameters \{'gamma': 1.0\} do not fit"):
        bind_preference_loss("dpo", {"gamma": 1.0}, key="model.dpo.preference_loss")
