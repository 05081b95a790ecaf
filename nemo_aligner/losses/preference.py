"""Preference losses as pure functions of per-pair quantities, in a registry by name.

Every loss has the signature `loss(pairs: PreferencePairs, *, beta: float, **own)`: it gets what a
pairwise loss may use (the chosen and rejected log-ratios, the policy's log-probs, response lengths,
the data's reward margin), the coefficient β (`ref_policy_kl_penalty`) and its own keyword
hyper-parameters (named as the fields of `model.dpo.loss_params`, which are bound by name), and
returns the per-pair loss [P], or (loss [P], {metric name: [P]}) when the loss has quantities of its
own to report; the caller normalises by the global pair count. A loss registered `reference_free`
never reads the log-ratios: with only such losses no reference is computed at all. A loss registered
`step_level` (AOT) ranks every pair of the optimizer step: the model then scores the step's pairs once
without gradients first and hands them over (PreferencePairs.step), so that each pair's share and its
gradient do not depend on which micro-batch or rank it lands on.
Notation: R = Σ_t m_t (log π_θ − log π_ref) over response tokens (÷ Σ_t m_t when log-probs are
averaged), Δ = R_chosen − R_rejected, g = gt_reward_scale · (r_chosen − r_rejected),
ā = Σ_t m_t log π_θ / Σ_t m_t (the policy's per-token mean), σ the logistic function.
"""

from __future__ import annotations

import functools
import inspect
import math
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
        averaged: whether R is a per-token mean (preference_average_log_probs).
        step, step_index: for the step-level losses (STEP_LEVEL), every pair of the optimizer step (all
            micro-batches and data-parallel ranks; no gradients) and each of these pairs' index in it;
            None: these pairs are the whole step.
    """

    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    gt_margin: torch.Tensor
    averaged: bool = False
    step: "PreferencePairs | None" = None
    step_index: torch.Tensor | None = None

    @property
    def margin(self) -> torch.Tensor:
        """Δ = R_chosen − R_rejected."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def chosen_avg_logps(self) -> torch.Tensor:
        """ā_chosen (an empty response counts as one token, so it stays finite)."""
        return self.chosen_logps / self.chosen_lengths.clamp(min=1.0)

    @property
    def rejected_avg_logps(self) -> torch.Tensor:
        return self.rejected_logps / self.rejected_lengths.clamp(min=1.0)

    @property
    def policy_margin(self) -> torch.Tensor:
        """log π_θ(y_c) − log π_θ(y_r) on R's scale: sums, or per-token means where R is averaged."""
        if self.averaged:
            return self.chosen_avg_logps - self.rejected_avg_logps
        return self.chosen_logps - self.rejected_logps

    def within_step(self) -> tuple["PreferencePairs", torch.Tensor]:
        """(every pair of the step, these pairs' indices in it); these pairs alone where no step was given."""
        if self.step is None or self.step_index is None:
            detached = {f: getattr(self, f).detach() for f in PAIR_TENSORS}
            return (PreferencePairs(**detached, averaged=self.averaged),
                    torch.arange(len(self.gt_margin), device=self.gt_margin.device))
        return self.step, self.step_index


# PreferencePairs' per-pair tensors
PAIR_TENSORS = ("chosen_logratios", "rejected_logratios", "chosen_logps", "rejected_logps", "chosen_lengths",
                "rejected_lengths", "gt_margin")


def preference_pairs(logprobs: torch.Tensor, mask: torch.Tensor, *, ref_logps: torch.Tensor | None,
                     average_log_probs: bool, gt_margin: torch.Tensor, step: PreferencePairs | None = None,
                     step_index: torch.Tensor | None = None) -> PreferencePairs:
    """The per-pair quantities of pair-layout rows (see nemo_aligner/types.py).

    logprobs, mask: [2P, T-1] policy log-probs and scored positions; ref_logps: [2P] the reference's
    Σ_t m_t log π_ref per row (how every reference strategy delivers it), or None when only
    reference-free losses run (R is then the policy's own log-prob); gt_margin: [P]; step, step_index:
    see PreferencePairs.
    """
    return pairs_from_row_sums((logprobs * mask).sum(dim=-1), mask.sum(dim=-1), ref_logps=ref_logps,
                               average_log_probs=average_log_probs, gt_margin=gt_margin, step=step,
                               step_index=step_index)


def pairs_from_row_sums(logps: torch.Tensor, lengths: torch.Tensor, *, ref_logps: torch.Tensor | None,
                        average_log_probs: bool, gt_margin: torch.Tensor, step: PreferencePairs | None = None,
                        step_index: torch.Tensor | None = None) -> PreferencePairs:
    """preference_pairs from each row's Σ_t m_t log π_θ and Σ_t m_t ([2P] each)."""
    ratios = logps if ref_logps is None else logps - ref_logps.to(logps.dtype)
    if average_log_probs:
        ratios = ratios / lengths.clamp(min=1.0)
    return PreferencePairs(chosen_logratios=chosen_rows(ratios), rejected_logratios=rejected_rows(ratios),
                           chosen_logps=chosen_rows(logps), rejected_logps=rejected_rows(logps),
                           chosen_lengths=chosen_rows(lengths), rejected_lengths=rejected_rows(lengths),
                           gt_margin=gt_margin, averaged=average_log_probs, step=step, step_index=step_index)


PreferenceLoss = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}
REFERENCE_FREE: set[str] = set()  # losses that never read the reference
STEP_LEVEL: set[str] = set()  # losses whose per-pair value depends on the other pairs of the optimizer step


def register_preference_loss(name: str, *, reference_free: bool = False,
                             step_level: bool = False) -> Callable[[PreferenceLoss], PreferenceLoss]:
    """Add a loss to PREFERENCE_LOSSES under `name`; a name can be registered once. A `step_level` loss
    reads `pairs.within_step()`, which the model fills with every pair of the step (PreferencePairs)."""

    def add(fn: PreferenceLoss) -> PreferenceLoss:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss '{name}' is already registered")
        PREFERENCE_LOSSES[name] = fn
        if reference_free:
            REFERENCE_FREE.add(name)
        if step_level:
            STEP_LEVEL.add(name)
        return fn

    return add


def split_loss(output: "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A loss's output as (per-pair loss, per-pair metrics)."""
    return output if isinstance(output, tuple) else (output, {})


def get_preference_loss(name: str) -> PreferenceLoss:
    """The registered loss `name`; an unknown name lists the known ones."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss '{name}'; valid: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]


def loss_parameters(name: str) -> list[str]:
    """The keyword hyper-parameters loss `name` reads (beyond β)."""
    return [p for p in inspect.signature(PREFERENCE_LOSSES[name]).parameters if p not in ("pairs", "beta")]


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
def dpo_loss(pairs: PreferencePairs, *, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, −log σ(βΔ) (Rafailov et al. 2023, arXiv 2305.18290, eq. 7); with label smoothing ε > 0,
    conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"): the label is right
    with probability 1 − ε, −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)."""
    return _smoothed_logistic(beta * pairs.margin, label_smoothing)


def _smoothed_logistic(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1 − ε) log σ(x) − ε log σ(−x): the logistic loss of x with the label flipped with chance ε."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


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


@register_preference_loss("robust")
def robust_loss(pairs: PreferencePairs, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO, Chowdhury et al. 2024, arXiv 2403.00409, eq. 8): an unbiased loss under labels
    flipped with probability ε, [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)."""
    return ((1 - label_smoothing) * -F.logsigmoid(beta * pairs.margin)
            + label_smoothing * F.logsigmoid(-beta * pairs.margin)) / (1 - 2 * label_smoothing)


@register_preference_loss("hinge")
def hinge_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """SLiC's calibration hinge on the log-ratios, max(0, 1 − βΔ) (Zhao et al. 2023, arXiv 2305.10425,
    eq. 2, with the reference-normalised likelihoods of DPO's framing: RSO, Liu et al. 2023, arXiv 2309.06657)."""
    return torch.relu(1 - beta * pairs.margin)


@register_preference_loss("exo_pair")
def exo_pair_loss(pairs: PreferencePairs, *, beta: float, exo_epsilon: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, arXiv 2402.00856, eq. 13, pairwise): the reverse KL from the policy's
    preference distribution σ(±βΔ) to the ε-smoothed label (1 − ε, ε),
    σ(βΔ)(log σ(βΔ) − log(1 − ε)) + σ(−βΔ)(log σ(−βΔ) − log ε)."""
    logit = beta * pairs.margin
    return (torch.sigmoid(logit) * (F.logsigmoid(logit) - math.log1p(-exo_epsilon))
            + torch.sigmoid(-logit) * (F.logsigmoid(-logit) - math.log(exo_epsilon)))


@register_preference_loss("nca_pair")
def nca_pair_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, arXiv 2402.05369, eq. 12, pairwise): absolute rewards r = βR, the chosen
    pushed up and both pulled from above, −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r)."""
    chosen, rejected = beta * pairs.chosen_logratios, beta * pairs.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register_preference_loss("sppo_hard")
def sppo_hard_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with win probabilities 1 and 0):
    each side's log-ratio regresses to ±1/(2β), (R_c − 1/(2β))² + (R_r + 1/(2β))²."""
    target = 0.5 / beta
    return (pairs.chosen_logratios - target) ** 2 + (pairs.rejected_logratios + target) ** 2


@register_preference_loss("apo_zero")
def apo_zero_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 5): raise the chosen likelihood and
    lower the rejected one, 1 − σ(βR_c) + σ(βR_r) (for chosen answers better than the model's)."""
    return 1 - torch.sigmoid(beta * pairs.chosen_logratios) + torch.sigmoid(beta * pairs.rejected_logratios)


@register_preference_loss("apo_down")
def apo_down_loss(pairs: PreferencePairs, *, beta: float) -> torch.Tensor:
    """APO-down (arXiv 2408.06266, eq. 6): lower both, the rejected more, σ(βR_c) + 1 − σ(βΔ) (for chosen
    answers worse than the model's)."""
    return torch.sigmoid(beta * pairs.chosen_logratios) + 1 - torch.sigmoid(beta * pairs.margin)


@register_preference_loss("discopop")
def discopop_loss(pairs: PreferencePairs, *, beta: float, discopop_tau: float) -> torch.Tensor:
    """DiscoPOP's log-ratio modulated loss (Chan et al. 2024, arXiv 2406.08414, eq. 4): with x = βΔ and
    w = σ(x/τ), (1 − w)(−log σ(x)) + w·e^(−x). The exponential term is taken as e^(−x + log σ(x/τ)),
    which stays finite for margins of any sign and size (τ < 1)."""
    logit = beta * pairs.margin
    modulation = torch.sigmoid(logit / discopop_tau)
    return (1 - modulation) * -F.logsigmoid(logit) + torch.exp(-logit + F.logsigmoid(logit / discopop_tau))


@register_preference_loss("bco_pair")
def bco_pair_loss(pairs: PreferencePairs, *, beta: float, bco_reward_mean: float) -> torch.Tensor:
    """BCO (Jung et al. 2024, arXiv 2404.04656, eq. 6, pairwise): a binary classifier of the rewards
    r = βR around δ, the running mean of all rewards of the earlier steps, −log σ(r_c − δ) − log σ(−(r_r − δ)).
    δ is state (STATE_PARAMETERS) the model keeps and binds here for each step."""
    chosen, rejected = beta * pairs.chosen_logratios, beta * pairs.rejected_logratios
    return -F.logsigmoid(chosen - bco_reward_mean) - F.logsigmoid(-(rejected - bco_reward_mean))


@register_preference_loss("simpo", reference_free=True)
def simpo_loss(pairs: PreferencePairs, *, beta: float, simpo_gamma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6), reference-free: the per-token mean log-probs as
    the reward, with a target margin γ, −log σ(β(ā_c − ā_r) − γ). Reports simpo_margin = ā_c − ā_r."""
    margin = pairs.chosen_avg_logps - pairs.rejected_avg_logps
    return -F.logsigmoid(beta * margin - simpo_gamma), {"simpo_margin": margin.detach()}


def _log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) of p = exp(ā), with ā kept below 0 so that 1 − p > 0."""
    avg_logps = avg_logps.clamp(max=-1e-6)
    return avg_logps - torch.log(-torch.expm1(avg_logps))


@register_preference_loss("orpo", reference_free=True)
def orpo_loss(pairs: PreferencePairs, *, beta: float, orpo_lambda: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 6–7), reference-free: the chosen response's NLL (per
    token) plus λ times the odds-ratio term, −ā_c − λ log σ(log odds(ā_c) − log odds(ā_r)), odds(ā) =
    e^ā / (1 − e^ā). β is not used. Reports orpo_log_odds_ratio and orpo_nll."""
    log_odds = _log_odds(pairs.chosen_avg_logps) - _log_odds(pairs.rejected_avg_logps)
    nll = -pairs.chosen_avg_logps
    return nll - orpo_lambda * F.logsigmoid(log_odds), {"orpo_log_odds_ratio": log_odds.detach(), "orpo_nll": nll.detach()}


@register_preference_loss("cpo", reference_free=True)
def cpo_loss(pairs: PreferencePairs, *, beta: float, cpo_alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CPO (Xu et al. 2024, arXiv 2401.08417, eq. 7), reference-free: DPO's loss with the reference dropped,
    −log σ(β(log π(y_c) − log π(y_r))), plus its behaviour-cloning term α times the chosen response's
    per-token NLL. Reports cpo_nll."""
    nll = -pairs.chosen_avg_logps
    return -F.logsigmoid(beta * (pairs.chosen_logps - pairs.rejected_logps)) + cpo_alpha * nll, {"cpo_nll": nll.detach()}


def _partner_at_rank(values: torch.Tensor, partners: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """For the step's `values` and `partners` ([N] each): the partner matched with each `index`ed value when
    both are sorted, i.e. sort(partners)[rank of values[index] among values] (ties in a fixed order)."""
    ranks = torch.empty(values.shape, dtype=torch.long, device=values.device)
    ranks[values.argsort(stable=True)] = torch.arange(len(values), device=values.device)
    return partners.sort(stable=True).values[ranks[index]]


def _matched_order_statistics(first: torch.Tensor, second: torch.Tensor, step_first: torch.Tensor,
                              step_second: torch.Tensor, index: torch.Tensor, *, beta: float,
                              label_smoothing: float) -> torch.Tensor:
    """Each pair's share of Σ_i ℓ(β(a_(i) − b_(i))), the (ε-smoothed logistic) loss of the step's sorted a
    against its sorted b (`step_first`, `step_second`): ℓ(β(a_j − b at a_j's rank)), which sums to the loss
    over the step, plus b_j's own term ℓ(β(a at b_j's rank − b_j)) with its value taken back out, so that
    the shares also carry the loss's exact gradient, whichever micro-batch and rank pair j is on."""
    second_at_rank = _partner_at_rank(step_first, step_second, index)
    first_at_rank = _partner_at_rank(step_second, step_first, index)
    first_side = _smoothed_logistic(beta * (first - second_at_rank), label_smoothing)
    second_side = _smoothed_logistic(beta * (first_at_rank - second), label_smoothing)
    return first_side + (second_side - second_side.detach())


@register_preference_loss("aot", step_level=True)
def aot_loss(pairs: PreferencePairs, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, with the logistic loss): the distribution of the
    policy's margins m = log π_θ(y_c) − log π_θ(y_r) should dominate the reference's, m_ref = m − Δ, in the
    first order, which on a sample is a match of order statistics: Σ_i ℓ(β(m_(i) − m_ref,(i))) over the
    sorted margins of every pair of the optimizer step, ℓ dpo's (ε-smoothed) logistic loss. With one pair
    per step it is dpo."""
    step, index = pairs.within_step()
    return _matched_order_statistics(pairs.policy_margin, pairs.policy_margin - pairs.margin, step.policy_margin,
                                     step.policy_margin - step.margin, index, beta=beta, label_smoothing=label_smoothing)


@register_preference_loss("aot_pair", step_level=True)
def aot_pair_loss(pairs: PreferencePairs, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT, unpaired (arXiv 2406.05882): the distribution of the chosen log-ratios R_c should dominate that
    of the rejected R_r, whichever pair each came from: Σ_i ℓ(β(R_c,(i) − R_r,(i))) over the sorted R of
    every pair of the step. With one pair per step it is dpo."""
    step, index = pairs.within_step()
    return _matched_order_statistics(pairs.chosen_logratios, pairs.rejected_logratios, step.chosen_logratios,
                                     step.rejected_logratios, index, beta=beta, label_smoothing=label_smoothing)


# Loss parameters that are training state rather than config: each is the running mean, over the training
# steps so far, of a step metric (reduced over data-parallel ranks, so every rank and layout agrees); the
# model keeps them, binds them at every step and checkpoints them. Parameter -> the metric it averages.
STATE_PARAMETERS = {"bco_reward_mean": "rewards_all_mean"}


@dataclass(frozen=True)
class PreferenceTerm:
    """One loss of a (weighted) combination, its config hyper-parameters bound."""

    name: str
    weight: float
    loss: PreferenceLoss
    state: tuple[str, ...]  # the STATE_PARAMETERS it reads, passed at each call

    @property
    def reference_free(self) -> bool:
        return self.name in REFERENCE_FREE

    @property
    def step_level(self) -> bool:
        return self.name in STEP_LEVEL


def build_preference_terms(names: list[str], weights: list[float], params: Mapping[str, Any], *,
                           key: str) -> list[PreferenceTerm]:
    """The combination Σ_i w_i · loss_i, each loss bound to the hyper-parameters it reads from `params`
    (its STATE_PARAMETERS left to each call); an unknown name fails naming `key`."""
    terms = []
    for name, weight in zip(names, weights):
        require(name in PREFERENCE_LOSSES, key, name, f"one of {sorted(PREFERENCE_LOSSES)}")
        state = tuple(p for p in loss_parameters(name) if p in STATE_PARAMETERS)
        own = {p: params[p] for p in loss_parameters(name) if p in params and p not in state}
        bind_preference_loss(name, {**own, **dict.fromkeys(state, 0.0)}, key=key)  # every parameter has a value
        terms.append(PreferenceTerm(name, weight, functools.partial(PREFERENCE_LOSSES[name], **own), state))
    return terms


def combined_preference_loss(pairs: PreferencePairs, terms: list[PreferenceTerm], *, beta: float,
                             state: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_i w_i · loss_i per pair [P], and the losses' own per-pair metrics; with several losses also each
    one's value as `<name>_loss`."""
    total, metrics = None, {}
    for term in terms:
        value, own = split_loss(term.loss(pairs, beta=beta, **{p: state[p] for p in term.state}))
        total = term.weight * value if total is None else total + term.weight * value
        metrics.update(own)
        if len(terms) > 1:
            metrics[f"{term.name}_loss"] = value.detach()
    return total, metrics  # type: ignore[return-value]
