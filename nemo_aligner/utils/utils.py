"""NeMo-Aligner's public utility names, so existing user code imports unchanged."""

from nemo_aligner.utils.ref_policy import cpu_weight_swap, retrieve_model_state_dict_in_cpu

__all__ = ["cpu_weight_swap", "retrieve_model_state_dict_in_cpu"]
