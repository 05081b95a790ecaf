"""Device tensors parked in host memory and brought back bit for bit (optimizer state while generating)."""

from __future__ import annotations

import torch


class HostOffload:
    """Moves tensors' contents into host buffers and frees their device storage; the tensors themselves
    stay (views and optimizer references keep working once restored). The host buffers are pinned
    where CUDA exists and kept for the next offload, matched by shape and dtype: pinning gigabytes
    anew every rollout costs seconds, an asynchronous copy into pinned memory runs at the link's speed.
    A set that grows (Adam's moments appear after the first update) pins only what it adds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[torch.Tensor] = []  # the last offload's, in its tensors' order
        self._moved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device tensor, its host copy) while offloaded

    @property
    def active(self) -> bool:
        return bool(self._moved)

    @property
    def host_buffers(self) -> list[torch.Tensor]:
        return self._buffers

    def _host_buffers_for(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """A host buffer per tensor: the kept ones of the same shape and dtype first (in order), new ones for
        the rest; kept buffers no tensor needs are released."""
        kept: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        for buffer in self._buffers:
            kept.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)
        pin = self.device.type == "cuda"
        out = []
        for tensor in tensors:
            same = kept.get((tuple(tensor.shape), tensor.dtype))
            out.append(same.pop(0) if same else torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin))
        return out

    @torch.no_grad()  # the tensors may be leaves that require grad (replicated masters): the copies are not autograd's
    def offload(self, tensors: list[torch.Tensor]) -> None:
        """Park `tensors` (those on this device with storage; each must own its whole storage)."""
        tensors = [t for t in tensors if t.device.type == self.device.type and t.untyped_storage().size() > 0]
        self._buffers = self._host_buffers_for(tensors)
        for tensor, host in zip(tensors, self._buffers):
            host.copy_(tensor.detach(), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the host holds the values before they are freed
        for tensor in tensors:
            tensor.untyped_storage().resize_(0)
        self._moved = list(zip(tensors, self._buffers))

    @torch.no_grad()
    def onload(self) -> None:
        """Restore what offload parked, into the same tensors (queued on the device's stream)."""
        for tensor, host in self._moved:
            tensor.untyped_storage().resize_(host.numel() * host.element_size())
            tensor.copy_(host, non_blocking=True)
        self._moved = []
