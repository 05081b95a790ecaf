"""Schema of examples/nlp/gpt/conf/serve_reward_model.yaml: the reward-model HTTP server."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_aligner.types import require


class RewardModelMode(enum.Enum):
    """What computes the rewards: an HF sequence-classification model, or a Python function."""

    sequence_classification = "sequence_classification"
    function = "function"


@dataclass
class RewardModelConfig:
    """reward_model: the scorer. Fields of the mode not chosen are ignored."""

    mode: RewardModelMode = RewardModelMode.function
    # sequence_classification: a LOCAL HF model directory (num_labels=1) with its tokenizer; never a hub id.
    model_path: Optional[str] = None
    # function: a Hydra spec of `f(prompt: str, response: str) -> float`. `_partial_` defaults to true, so
    # `_target_` names the function itself (other keys are bound as keyword arguments); with
    # `_partial_: false` the target is a factory that returns the callable.
    function: Optional[dict[str, Any]] = field(default_factory=lambda: {
        "_target_": "examples.tiny.task.exact_match_reward", "_partial_": True})
    max_length: int = 4096  # sequence_classification: prompt + response tokens; longer items are rejected (422)

    def __post_init__(self) -> None:
        require(self.max_length >= 1, "reward_model.max_length", self.max_length, ">= 1")
        if self.mode is RewardModelMode.sequence_classification:
            require(bool(self.model_path), "reward_model.model_path", self.model_path,
                     "a local Hugging Face model directory when reward_model.mode=sequence_classification")
        else:
            require(isinstance(self.function, dict) and "_target_" in self.function, "reward_model.function",
                     self.function, "a dict with a `_target_` (a reward function) when reward_model.mode=function")


@dataclass
class BatchingConfig:
    """batching: how concurrent requests are grouped into one model call."""

    max_batch_size: int = 32  # items (prompt + response pairs) per model call
    max_wait_ms: float = 5.0  # how long a batch waits for more requests before it runs

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, "batching.max_batch_size", self.max_batch_size, ">= 1")
        require(self.max_wait_ms >= 0, "batching.max_wait_ms", self.max_wait_ms, ">= 0")


@dataclass
class RewardServerConfig:
    """examples/nlp/gpt/serve_reward_model.py: serve rewards over HTTP for rejection sampling."""

    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    auth_token: Optional[str] = None  # shared secret: clients send `Authorization: Bearer <token>`; null: open
    max_request_items: int = 4096  # items in one /score request; more is rejected (413)
    max_request_bytes: int = 16 * 1024 * 1024  # body size of one /score request; more is rejected (413)
    host: str = "127.0.0.1"  # 0.0.0.0 to accept connections from other hosts
    port: int = 5555

    def __post_init__(self) -> None:
        require(self.auth_token is None or len(self.auth_token) > 0, "auth_token", self.auth_token,
                 "null or a non-empty string")
        require(self.max_request_items >= 1, "max_request_items", self.max_request_items, ">= 1")
        require(self.max_request_bytes >= 1, "max_request_bytes", self.max_request_bytes, ">= 1")
        require(1 <= self.port <= 65535, "port", self.port, "in [1, 65535]")
