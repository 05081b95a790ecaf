"""The reference policy π_ref: one interface (ReferencePolicy), one class per strategy."""

from nemo_aligner.reference.base import ReferencePolicy
from nemo_aligner.reference.host_copy import HostCopyReference, host_copy_of_weights, weights_swapped_in

__all__ = ["HostCopyReference", "ReferencePolicy", "host_copy_of_weights", "weights_swapped_in"]
