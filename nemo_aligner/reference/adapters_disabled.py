"""The reference as the policy network with its LoRA adapters switched off (model.peft.peft_scheme=lora).

The adapters start at B = 0, so the network without them is the initial model, exactly and for good: the
base weights are frozen. Nothing is copied or swapped and nothing is saved (the base is the HF directory
the run starts from). DPO only: SPIN's reference must become the current policy each iteration, which
the frozen base cannot (its LoRA runs copy the adapters instead: resident or swap).
"""

from __future__ import annotations

from typing import ContextManager

from nemo_aligner.engines.base import Engine
from nemo_aligner.reference.base import ComputedOnThePolicyNetwork


class AdaptersDisabledReference(ComputedOnThePolicyNetwork):
    """ReferencePolicy computing with the engine's adapters disabled (see the module docstring)."""

    name = "adapters_disabled"

    def __init__(self, engine: Engine) -> None:
        if not engine.has_adapters:
            raise ValueError("model.dpo.reference.strategy=adapters_disabled needs LoRA adapters: set "
                             "model.peft.peft_scheme=lora")
        self.engine = engine

    def active(self) -> ContextManager[None]:
        return self.engine.adapters_disabled()

    def become_current_policy(self) -> None:
        raise RuntimeError("the adapter-disabled reference is the base model for good; it cannot become the policy")

    def save(self, path: str) -> None:
        """Nothing to write: the reference is the frozen base."""

    def load(self, path: str) -> None:
        """Nothing to read: the reference is the frozen base."""
