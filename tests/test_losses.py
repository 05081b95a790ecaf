"""Preference losses against hand-computed values (plain-Python math) and their gradient signs."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.losses import (
    PREFERENCE_LOSSES,
    get_preference_loss,
    register_preference_loss,
    sequence_log_ratio,
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


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_values(name: str) -> None:
    loss = get_preference_loss(name)(torch.tensor(DELTA, dtype=torch.float64), beta=BETA,
                                     gt_margin=torch.tensor(GT, dtype=torch.float64))
    assert loss.tolist() == pytest.approx(EXPECTED[name], rel=1e-12)


def _grad(name: str, delta: float, gt: float) -> float:
    d = torch.tensor([delta], dtype=torch.float64, requires_grad=True)
    get_preference_loss(name)(d, beta=BETA, gt_margin=torch.tensor([gt], dtype=torch.float64)).sum().backward()
    return d.grad.item()


def test_gradient_signs() -> None:
    assert _grad("dpo", 3.0, 0.0) < 0 and _grad("dpo", -3.0, 0.0) < 0  # always widen the margin
    assert _grad("ipo", 1.0, 0.0) < 0 < _grad("ipo", 9.0, 0.0)  # pulled toward 1/(2β) = 5
    for name in ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"):  # pulled toward βΔ = g, i.e. Δ = 20 for g = 2
        assert _grad(name, 10.0, 2.0) < 0 < _grad(name, 30.0, 2.0), name
        assert abs(_grad(name, 20.0, 2.0)) < 1e-12, name


def test_registry_rejects_duplicates_and_lists_names() -> None:
    assert sorted(PREFERENCE_LOSSES) == ["dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"]
    with pytest.raises(ValueError, match="already registered"):
        register_preference_loss("dpo")(lambda delta, *, beta, gt_margin: delta)
    with pytest.raises(ValueError, match=r"unknown preference loss 'kto'; valid: \['dpo', 'ipo'"):
        get_preference_loss("kto")


def test_sequence_reductions_and_empty_responses() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert sequence_log_ratio(logprobs, ref, mask, average=False).tolist() == [-3.0, 0.0]
    assert sequence_log_ratio(logprobs, ref, mask, average=True).tolist() == [-1.5, 0.0]
    assert sequence_nll(logprobs, mask, average=False).tolist() == [5.0, 0.0]
    assert sequence_nll(logprobs, mask, average=True).tolist() == [2.5, 0.0]
