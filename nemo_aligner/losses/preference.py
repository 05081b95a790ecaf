"""Preference losses as pure functions of per-pair reward margins, in a registry by name.

Notation (shapes [P], one entry per preference pair):
  delta      Δ = R_chosen − R_rejected, with R = Σ_t m_t (log π_θ − log π_ref) over response tokens
             (divided by Σ_t m_t when log-probs are averaged);
  beta       β, the KL-penalty coefficient (`ref_policy_kl_penalty`);
  gt_margin  g = gt_reward_scale · (r_chosen − r_rejected), from the data's rewards.
Each function returns the per-pair loss [P]; the caller normalises by the global pair count.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

PreferenceLoss = Callable[..., torch.Tensor]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def register_preference_loss(name: str) -> Callable[[PreferenceLoss], PreferenceLoss]:
    """Add a loss to PREFERENCE_LOSSES under `name`; a name can be registered once."""

    def add(fn: PreferenceLoss) -> PreferenceLoss:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss '{name}' is already registered")
        PREFERENCE_LOSSES[name] = fn
        return fn

    return add


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registered loss `name`; an unknown name lists the known ones."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss '{name}'; valid: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]


@register_preference_loss("dpo")
def dpo_loss(delta: torch.Tensor, *, beta: float, gt_margin: torch.Tensor) -> torch.Tensor:
    """DPO, −log σ(βΔ) (Rafailov et al. 2023, arXiv 2305.18290, eq. 7). gt_margin is unused."""
    return -F.logsigmoid(beta * delta)


@register_preference_loss("ipo")
def ipo_loss(delta: torch.Tensor, *, beta: float, gt_margin: torch.Tensor) -> torch.Tensor:
    """IPO, (Δ − 1/(2β))² (Azar et al. 2023, arXiv 2310.12036, eq. 17): regresses the margin to a
    fixed target instead of pushing it to infinity. Usually paired with averaged log-probs."""
    return (delta - 1.0 / (2.0 * beta)) ** 2


@register_preference_loss("rpo_sq")
def rpo_sq_loss(delta: torch.Tensor, *, beta: float, gt_margin: torch.Tensor) -> torch.Tensor:
    """RPO squared distance, (βΔ − g)²: the implicit reward margin regresses onto the data's
    reward margin (Nemotron-4 340B report, arXiv 2406.11704, sec. 3.4.2)."""
    return (beta * delta - gt_margin) ** 2


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bern(σ(logit_p)) ‖ Bern(σ(logit_q))), from log-sigmoids so it stays finite."""
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


@register_preference_loss("rpo_bwd_kl")
def rpo_bwd_kl_loss(delta: torch.Tensor, *, beta: float, gt_margin: torch.Tensor) -> torch.Tensor:
    """RPO backward KL, KL(Bern(σ(g)) ‖ Bern(σ(βΔ))): the data's preference probability is the
    target distribution (arXiv 2406.11704)."""
    return _bernoulli_kl(gt_margin, beta * delta)


@register_preference_loss("rpo_fwd_kl")
def rpo_fwd_kl_loss(delta: torch.Tensor, *, beta: float, gt_margin: torch.Tensor) -> torch.Tensor:
    """RPO forward KL, KL(Bern(σ(βΔ)) ‖ Bern(σ(g))) (arXiv 2406.11704)."""
    return _bernoulli_kl(beta * delta, gt_margin)


def sequence_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, *,
                       average: bool) -> torch.Tensor:
    """R per row: Σ_t m_t (log π − log π_ref), divided by Σ_t m_t when `average`.

    logprobs, ref_logprobs, mask: [N, T-1] (target-aligned); returns [N]. A row with no response
    tokens has R = 0 (no division by zero).
    """
    summed = ((logprobs - ref_logprobs) * mask).sum(dim=-1)
    return summed / mask.sum(dim=-1).clamp(min=1.0) if average else summed


def sequence_nll(logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool) -> torch.Tensor:
    """−Σ_t m_t log π per row [N], divided by Σ_t m_t when `average` (0 for an empty response)."""
    summed = -(logprobs * mask).sum(dim=-1)
    return summed / mask.sum(dim=-1).clamp(min=1.0) if average else summed
