"""Preference losses as pure functions of per-pair quantities, in a registry by name.

Every loss has the signature `loss(pairs: PreferencePairs, *, beta: float, **own) -> [P]`: it gets
what a pairwise loss may use (the chosen and rejected log-ratios, the policy's log-probs, response
lengths, the data's reward margin), the KL coefficient β (`ref_policy_kl_penalty`) and its own
typed keyword hyper-parameters, and returns the per-pair loss; the caller normalises by the global
pair count. Notation: R = Σ_t m_t (log π_θ − log π_ref) over response tokens (÷ Σ_t m_t when
log-probs are averaged), Δ = R_chosen − R_rejected, g = gt_reward_scale · (r_chosen − r_rejected).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from nemo_aligner.types import chosen_rows, rejected_rows, require


@dataclass(frozen=True)
class PreferencePairs:
    """What a preference loss may use, one entry per pair (each [P]).

    Attributes:
        chosen_logratios, rejected_logratios: R of each side (a sum, or a per-token mean when the
            config averages log-probs).
        chosen_logps, rejected_logps: Σ_t m_t log π_θ of each side (policy only, always a sum).
        chosen_lengths, rejected_lengths: Σ_t m_t, the response tokens of each side.
        gt_margin: g, the data's scaled reward margin.
    """

    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    gt_margin: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        """Δ = R_chosen − R_rejected."""
        return self.chosen_logratios - self.rejected_logratios


def preference_pairs(logprobs: torch.Tensor, mask: torch.Tensor, *, ref_logps: torch.Tensor, average_log_probs: bool,
                     gt_margin: torch.Tensor) -> PreferencePairs:
    """The per-pair quantities of pair-layout rows (see nemo_aligner/types.py).

    logprobs, mask: [2P, T-1] policy log-probs and scored positions; ref_logps: [2P] the reference's
    Σ_t m_t log π_ref per row (how every reference strategy delivers it); gt_margin: [P].
    """
    logps, lengths = (logprobs * mask).sum(dim=-1), mask.sum(dim=-1)
    ratios = logps - ref_logps.to(logps.dtype)
    if average_log_probs:
        ratios = ratios / lengths.clamp(min=1.0)
    return PreferencePairs(chosen_logratios=chosen_rows(ratios), rejected_logratios=rejected_rows(ratios),
                           chosen_logps=chosen_rows(logps), rejected_logps=rejected_rows(logps),
                           chosen_lengths=chosen_rows(lengths), rejected_lengths=rejected_rows(lengths),
                           gt_margin=gt_margin)


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


def bind_preference_loss(name: str, params: Mapping[str, Any], *, key: str) -> PreferenceLoss:
    """The loss `name` with its own hyper-parameters bound: `loss(pairs, *, beta)`.

    Checked when a model is built, before anything else: an unknown name fails naming the config
    `key` and the known names; hyper-parameters the loss does not take fail naming the loss.
    """
    require(name in PREFERENCE_LOSSES, key, name, f"one of {sorted(PREFERENCE_LOSSES)}")
    loss = PREFERENCE_LOSSES[name]
    try:
        inspect.signature(loss).bind(None, beta=0.0, **params)
    except TypeError as err:
        raise ValueError(f"{key}={name!r}: hyper-parameters {dict(params)} do not fit the loss ({err})") from None
    return functools.partial(loss, **params) if params else loss


@register_preference_loss("dpo")
def dpo_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """DPO, −log σ(βΔ) (Rafailov et al. 2023, arXiv 2305.18290, eq. 7)."""
    return -F.logsigmoid(beta * pairs.margin)


@register_preference_loss("ipo")
def ipo_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """IPO, (Δ − 1/(2β))² (Azar et al. 2023, arXiv 2310.12036, eq. 17): regresses the margin to a
    fixed target instead of pushing it to infinity. Usually paired with averaged log-probs."""
    return (pairs.margin - 1.0 / (2.0 * beta)) ** 2


@register_preference_loss("rpo_sq")
def rpo_sq_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """RPO squared distance, (βΔ − g)²: the implicit reward margin regresses onto the data's
    reward margin (Nemotron-4 340B report, arXiv 2406.11704, sec. 3.4.2)."""
    return (beta * pairs.margin - pairs.gt_margin) ** 2


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bern(σ(logit_p)) ‖ Bern(σ(logit_q))), from log-sigmoids so it stays finite."""
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


@register_preference_loss("rpo_bwd_kl")
def rpo_bwd_kl_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """RPO backward KL, KL(Bern(σ(g)) ‖ Bern(σ(βΔ))): the data's preference probability is the
    target distribution (arXiv 2406.11704)."""
    return _bernoulli_kl(pairs.gt_margin, beta * pairs.margin)


@register_preference_loss("rpo_fwd_kl")
def rpo_fwd_kl_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """RPO forward KL, KL(Bern(σ(βΔ)) ‖ Bern(σ(g))) (arXiv 2406.11704)."""
    return _bernoulli_kl(beta * pairs.margin, pairs.gt_margin)
