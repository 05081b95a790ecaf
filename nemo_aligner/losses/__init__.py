"""Pure loss functions: preference losses (a registry by name), the per-algorithm objectives of a
micro-batch (DPO, SPIN, SFT) and the per-sequence reductions they share."""

from nemo_aligner.losses.dpo import dpo_loss_fn, finalize_dpo_metrics
from nemo_aligner.losses.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE,
    PreferencePairs,
    PreferenceTerm,
    build_preference_terms,
    bind_preference_loss,
    dpo_loss,
    get_preference_loss,
    ipo_loss,
    preference_pairs,
    register_preference_loss,
    rpo_bwd_kl_loss,
    rpo_fwd_kl_loss,
    rpo_sq_loss,
)
from nemo_aligner.losses.sequence import masked_nll_sum, sequence_nll
from nemo_aligner.losses.sft import sequence_mean_nll_loss_fn, sft_loss_fn
from nemo_aligner.losses.spin import spin_loss_fn

__all__ = [
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE",
    "PreferencePairs",
    "PreferenceTerm",
    "build_preference_terms",
    "bind_preference_loss",
    "dpo_loss",
    "dpo_loss_fn",
    "finalize_dpo_metrics",
    "get_preference_loss",
    "ipo_loss",
    "masked_nll_sum",
    "preference_pairs",
    "register_preference_loss",
    "rpo_bwd_kl_loss",
    "rpo_fwd_kl_loss",
    "rpo_sq_loss",
    "sequence_mean_nll_loss_fn",
    "sequence_nll",
    "sft_loss_fn",
    "spin_loss_fn",
]
