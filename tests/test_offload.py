"""HostOffload: tensors parked in host memory come back bit for bit into the same tensors, and the host
buffers are kept and matched by shape and dtype, so a set that grows pins only what it adds."""

from __future__ import annotations

import torch

from nemo_aligner.utils.offload import HostOffload


def test_round_trip_is_bit_exact_in_the_same_tensors_even_for_leaves_that_require_grad() -> None:
    offload = HostOffload(torch.device("cpu"))
    leaf = torch.nn.Parameter(torch.randn(3, 4))
    state = torch.randn(5, dtype=torch.float64)
    before = [leaf.detach().clone(), state.clone()]
    offload.offload([leaf, state])
    assert offload.active and leaf.untyped_storage().size() == 0 and state.untyped_storage().size() == 0
    offload.onload()
    assert not offload.active
    assert torch.equal(leaf.detach(), before[0]) and torch.equal(state, before[1])


def test_host_buffers_are_kept_and_a_growing_set_allocates_only_what_it_adds() -> None:
    offload = HostOffload(torch.device("cpu"))
    masters = [torch.randn(4, 4), torch.randn(8)]
    offload.offload(masters)
    first = [b.data_ptr() for b in offload.host_buffers]
    offload.onload()
    moments = [torch.randn(4, 4), torch.randn(8), torch.randn(4, 4)]  # Adam's moments appear after a step
    values = [t.clone() for t in moments + masters]
    offload.offload(moments + masters)
    now = [b.data_ptr() for b in offload.host_buffers]
    assert len(set(now)) == 5 and set(first) <= set(now)  # the masters' buffers serve again; three are new
    offload.onload()
    assert all(torch.equal(a, b) for a, b in zip(moments + masters, values))
    offload.offload(moments + masters)  # the same set again: the same buffers in the same order
    assert [b.data_ptr() for b in offload.host_buffers] == now
    offload.onload()
