"""Reward sources for rejection sampling: a Python function in process, or the reward server.

Both are called as `reward(prompts, responses) -> [float]` and checked the same way: one finite
score per response, else an error naming the batch, so nothing trains on a bad score.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol, Sequence

import torch.distributed as dist

from nemo_aligner.config.loader import instantiate_target
from nemo_aligner.config.rs import RemoteRMConfig, RewardConfig, RewardSource
from nemo_aligner.servers.client import RemoteRewardClient, score_on_rank0_and_broadcast
from nemo_aligner.utils.errors import InputError


class RewardError(RuntimeError, InputError):
    """The reward source returned the wrong number of scores or a non-finite score."""


class Reward(Protocol):
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


class FunctionReward:
    """`fn(prompt, response) -> float` applied to each pair, in this process."""

    def __init__(self, fn: Callable[[str, str], float]) -> None:
        self.fn = fn

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]


class RemoteReward:
    """The reward server; one rank of each model-parallel group sends, the others get a broadcast."""

    def __init__(self, client: RemoteRewardClient, group: dist.ProcessGroup | None) -> None:
        self.client, self.group = client, group

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return score_on_rank0_and_broadcast(self.client, list(prompts), list(responses), self.group)


def checked_rewards(reward: Reward, prompts: Sequence[str], responses: Sequence[str], *, batch: str) -> list[float]:
    """Scores from `reward`, or RewardError naming `batch` if any is missing, extra or not finite."""
    scores = reward(prompts, responses)
    if len(scores) != len(responses):
        raise RewardError(f"{batch}: the reward source returned {len(scores)} scores for {len(responses)} responses")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise RewardError(f"{batch}: non-finite rewards at positions {bad[:10]} (e.g. {scores[bad[0]]}); "
                          "nothing was trained on this batch")
    return scores


def build_reward(reward: RewardConfig, remote_rm: RemoteRMConfig, group: dist.ProcessGroup | None) -> Reward:
    """The configured reward source; a remote one is checked for health and for its token first and
    called by the first rank of `group` (the ranks that share a data-parallel share, see
    GPTModel.model_parallel_group), which broadcasts the scores to the others."""
    if reward.source is RewardSource.function:
        if reward.function is None:
            raise ValueError("reward.source=function needs reward.function (a Hydra _target_ with _partial_: true)")
        return FunctionReward(instantiate_target(reward.function, key="reward.function"))
    endpoint = remote_rm.reward_model
    client = RemoteRewardClient(endpoint.ip, endpoint.port, timeout_s=remote_rm.timeout_s, max_retries=remote_rm.max_retries,
                                backoff_s=remote_rm.backoff_s, auth_token=remote_rm.auth_token)
    client.wait_until_healthy(remote_rm.timeout_s)
    client.check_token()
    return RemoteReward(client, group)
