"""Pure loss functions: preference losses (a registry by name) and the supervised NLL."""

from nemo_aligner.losses.preference import (
    PREFERENCE_LOSSES,
    dpo_loss,
    get_preference_loss,
    ipo_loss,
    register_preference_loss,
    rpo_bwd_kl_loss,
    rpo_fwd_kl_loss,
    rpo_sq_loss,
    sequence_log_ratio,
    sequence_nll,
)
from nemo_aligner.losses.sft import masked_nll_sum, sft_loss_fn

__all__ = [
    "PREFERENCE_LOSSES",
    "dpo_loss",
    "get_preference_loss",
    "ipo_loss",
    "masked_nll_sum",
    "register_preference_loss",
    "rpo_bwd_kl_loss",
    "rpo_fwd_kl_loss",
    "rpo_sq_loss",
    "sequence_log_ratio",
    "sequence_nll",
    "sft_loss_fn",
]
