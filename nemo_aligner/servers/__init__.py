"""Rewards for rejection sampling: the reward-model HTTP server, its client, and the reward sources
the trainer calls (an in-process function or the server; nemo_aligner/servers/rewards.py).

The client side (`RemoteRewardClient`, `RewardServerError`, `score_on_rank0_and_broadcast`) is
imported eagerly; the server side (`build_app`, `build_scorer`, `serve`) on first use, so a trainer
that only calls a server does not import FastAPI.
"""

from __future__ import annotations

from typing import Any

from nemo_aligner.servers.client import RemoteRewardClient, RewardServerError, score_on_rank0_and_broadcast

_SERVER_NAMES = {"build_app": "reward_server", "serve": "reward_server", "build_scorer": "scorers"}

__all__ = ["RemoteRewardClient", "RewardServerError", "score_on_rank0_and_broadcast", *_SERVER_NAMES]


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        import importlib

        return getattr(importlib.import_module(f"nemo_aligner.servers.{_SERVER_NAMES[name]}"), name)
    raise AttributeError(f"module 'nemo_aligner.servers' has no attribute {name!r}")
