"""NeMo-Aligner's MegatronGPTDPOModel: our GPTDPOModel (on whichever engine `model.engine` names)
with NeMo-Aligner's method names. Build it with nemo_aligner.utils.utils.load_from_nemo."""

from __future__ import annotations

from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.models.nlp.gpt.nemo_aligner_api import AdamOffloadMethods, PairLossMethods, ReferencePolicyMethods


class MegatronGPTDPOModel(AdamOffloadMethods, PairLossMethods, ReferencePolicyMethods, GPTDPOModel):
    # NeMo-Aligner's scripts set ref_policy_state_dict, so reference.strategy=auto holds the weights
    # (resident when they fit, else swap) rather than precomputing.
    auto_reference_precomputed = False
