"""The reference policy π_ref: one interface (ReferencePolicy), one class per strategy, chosen by
`reference.strategy` in the algorithm's config (build_reference_policy)."""

from nemo_aligner.reference.base import ReferencePolicy, sum_over_scored
from nemo_aligner.reference.build import build_reference_policy
from nemo_aligner.reference.none import NoReference
from nemo_aligner.reference.precomputed import PrecomputedReference
from nemo_aligner.reference.weight_copy import WeightCopyReference, copy_of_weights

__all__ = ["NoReference", "PrecomputedReference", "ReferencePolicy", "WeightCopyReference", "build_reference_policy",
           "copy_of_weights", "sum_over_scored"]
