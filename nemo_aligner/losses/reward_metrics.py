"""Implicit-reward metrics shared by the pairwise models (DPO, SPIN).

Inside a loss function the rewards of a micro-batch become first and second moments divided by
the global pair count, so they sum correctly over micro-batches and ranks; after the reduction
`finalize_reward_metrics` turns them into means, the std and (optionally) the margin.
"""

from __future__ import annotations

import math

import torch


def reward_moments(first: torch.Tensor, second: torch.Tensor, global_pairs: torch.Tensor, *,
                   first_name: str, second_name: str) -> dict[str, torch.Tensor]:
    """Moment sums of the two rewards of each pair ([P] each), normalised by the global pair count."""
    return {
        f"rewards_{first_name}_mean": first.sum() / global_pairs,
        f"rewards_{second_name}_mean": second.sum() / global_pairs,
        "rewards_all_mean": (first.sum() + second.sum()) / (2 * global_pairs),
        "rewards_all_sq_mean": (first.square().sum() + second.square().sum()) / (2 * global_pairs),
    }


def finalize_reward_metrics(sums: dict[str, torch.Tensor], *, margin_of: tuple[str, str] | None = None) -> dict[str, float]:
    """Reduced sums -> floats; replaces the second moment by rewards_all_std and adds
    rewards_margin_mean = first - second when `margin_of` names the two rewards."""
    out = {name: value.item() for name, value in sums.items() if name != "rewards_all_sq_mean"}
    out["rewards_all_std"] = math.sqrt(max(sums["rewards_all_sq_mean"].item() - out["rewards_all_mean"] ** 2, 0.0))
    if margin_of is not None:
        out["rewards_margin_mean"] = out[f"rewards_{margin_of[0]}_mean"] - out[f"rewards_{margin_of[1]}_mean"]
    return out
