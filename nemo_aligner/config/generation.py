"""Generation settings shared by the algorithms that sample from the policy (SPIN, rejection sampling)."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_aligner.config.schema import _require
from nemo_aligner.engines.base import LengthParams, SamplingParams


@dataclass
class SamplingParamsConfig:
    """How the rejected responses are sampled (NeMo-Aligner's sampling_params keys)."""

    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus sampling

    def __post_init__(self) -> None:
        _require(self.temperature > 0, "sampling_params.temperature", self.temperature, "> 0")
        _require(self.top_k >= 0, "sampling_params.top_k", self.top_k, ">= 0")
        _require(0 < self.top_p <= 1, "sampling_params.top_p", self.top_p, "in (0, 1]")

    def build(self) -> SamplingParams:
        return SamplingParams(use_greedy=self.use_greedy, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)


@dataclass
class LengthParamsConfig:
    """How long the generations may be (NeMo-Aligner's length_params keys), in new tokens."""

    max_length: int = 16
    min_length: int = 0

    def __post_init__(self) -> None:
        _require(self.max_length >= 1, "length_params.max_length", self.max_length, ">= 1")
        _require(0 <= self.min_length <= self.max_length, "length_params.min_length", self.min_length,
                 f"in [0, max_length={self.max_length}]")

    def build(self) -> LengthParams:
        return LengthParams(max_length=self.max_length, min_length=self.min_length)
