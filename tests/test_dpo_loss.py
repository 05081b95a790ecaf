"""dpo_loss_fn (with model.dpo bound as GPTDPOModel binds it) against a naive per-pair loop written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.config.dpo import DPOLossConfig
from nemo_aligner.losses.dpo import finalize_dpo_metrics
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import build_dpo_loss_fn


def _naive(lp, ref, mask, rewards, cfg: DPOLossConfig) -> dict[str, float]:
    beta, pairs = cfg.ref_policy_kl_penalty, len(lp) // 2
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    totals = {k: 0.0 for k in ("loss", "preference_loss", "sft_loss", "acc")}
    all_rewards = []
    for i in range(pairs):
        R = []
        for row in (2 * i, 2 * i + 1):
            s = sum((lp[row][t] - ref[row][t]) * mask[row][t] for t in range(len(mask[row])))
            n = sum(mask[row])
            R.append(s / max(n, 1) if cfg.preference_average_log_probs else s)
        d, g = R[0] - R[1], cfg.gt_reward_scale * (rewards[2 * i] - rewards[2 * i + 1])
        p, q = sig(g), sig(beta * d)
        pref = {"dpo": -math.log(sig(beta * d)), "ipo": (d - 1 / (2 * beta)) ** 2, "rpo_sq": (beta * d - g) ** 2,
                "rpo_bwd_kl": p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)),
                "rpo_fwd_kl": q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))}[cfg.preference_loss]
        nll = -sum(lp[2 * i][t] * mask[2 * i][t] for t in range(len(mask[0])))
        sft = nll / max(sum(mask[2 * i]), 1) if cfg.sft_average_log_probs else nll
        totals["loss"] += (cfg.preference_loss_weight * pref + cfg.sft_loss_weight * sft) / pairs
        totals["preference_loss"] += pref / pairs
        totals["sft_loss"] += sft / pairs
        totals["acc"] += float(R[0] > R[1]) / pairs
        all_rewards += [beta * R[0], beta * R[1]]
    totals["rewards_chosen_mean"] = sum(all_rewards[0::2]) / pairs
    totals["rewards_rejected_mean"] = sum(all_rewards[1::2]) / pairs
    mean = sum(all_rewards) / len(all_rewards)
    totals["rewards_all_mean"] = mean
    totals["rewards_all_std"] = math.sqrt(sum((r - mean) ** 2 for r in all_rewards) / len(all_rewards))
    totals["rewards_margin_mean"] = totals["rewards_chosen_mean"] - totals["rewards_rejected_mean"]
    return totals


@pytest.mark.parametrize("name", ["dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"])
@pytest.mark.parametrize("average", [False, True])
def test_dpo_loss_fn_matches_naive_loop(name: str, average: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, width = 6, 7
    lp = -torch.rand(rows, width + 1, generator=gen, dtype=torch.float64) * 3
    ref = -torch.rand(rows, width + 1, generator=gen, dtype=torch.float64) * 3
    loss_mask = (torch.rand(rows, width + 1, generator=gen) > 0.3).double()
    loss_mask[:, 0] = 0
    loss_mask[3, :] = 0  # an empty rejected response
    rewards = torch.tensor([1.0, 0.0, 0.7, 0.2, 3.0, -1.0], dtype=torch.float64)
    cfg = DPOLossConfig(ref_policy_kl_penalty=0.3, preference_loss=name, preference_loss_weight=0.8,
                        sft_loss_weight=0.25, preference_average_log_probs=average, sft_average_log_probs=average,
                        gt_reward_scale=1.5)
    batch = {"loss_mask": loss_mask, "ref_logps": (ref[:, 1:] * loss_mask[:, 1:]).sum(-1), "rewards": rewards}
    loss, sums = build_dpo_loss_fn(cfg)(lp[:, 1:], batch, global_pairs=torch.tensor(3.0, dtype=torch.float64))
    got = {"loss": loss.item(), **finalize_dpo_metrics(sums)}
    want = _naive(lp[:, 1:].tolist(), ref[:, 1:].tolist(), loss_mask[:, 1:].tolist(), rewards.tolist(), cfg)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def test_splitting_pairs_across_micro_batches_sums_to_the_whole() -> None:
    gen = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(8, 5, generator=gen), -torch.rand(8, 5, generator=gen)
    batch = {"loss_mask": torch.ones(8, 6), "ref_logps": ref.sum(-1), "rewards": torch.zeros(8)}
    loss_fn = build_dpo_loss_fn(DPOLossConfig())
    whole, _ = loss_fn(lp, batch, global_pairs=torch.tensor(4.0))
    halves = sum(loss_fn(lp[i:i + 4], {k: v[i:i + 4] for k, v in batch.items()}, global_pairs=torch.tensor(4.0))[0]
                 for i in (0, 4))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)


def test_both_weights_zero_is_a_config_error_and_an_unknown_loss_fails_when_bound() -> None:
    with pytest.raises(ValueError, match="both 0"):
        DPOLossConfig(preference_loss_weight=0.0, sft_loss_weight=0.0)
    with pytest.raises(ValueError, match=r"model.dpo.preference_loss='kto' is invalid: it must be one of \[.*'dpo'"):
        build_dpo_loss_fn(DPOLossConfig(preference_loss="kto"))
