"""NeMo-Aligner's MegatronGPTDPOModel: our GPTDPOModel (on whichever engine `model.engine` names)
with NeMo-Aligner's method names. Build it with nemo_aligner.utils.utils.load_from_nemo."""

from __future__ import annotations

from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import AdamOffloadMethods, ReferencePolicyMethods
from nemo_aligner.types import Batch


class MegatronGPTDPOModel(AdamOffloadMethods, ReferencePolicyMethods, GPTDPOModel):
    # NeMo-Aligner's scripts set ref_policy_state_dict, so reference.strategy=auto holds the weights
    # (resident when they fit, else swap) rather than precomputing.
    auto_reference_precomputed = False

    def get_loss_and_metrics(self, batch: Batch, forward_only: bool) -> tuple[float, dict[str, float]]:
        """(loss, metrics) of a pair batch, scored against the reference; gradients unless forward_only."""
        metrics = self.loss_and_metrics(batch, forward_only=forward_only)
        return metrics["loss"], metrics
