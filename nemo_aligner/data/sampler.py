"""Global-batch sampling over data-parallel ranks that resumes exactly from consumed_samples.

Epoch e visits the dataset in the order perm_e (a permutation seeded with seed + e, or the identity
without shuffling). Global batch b of epoch e is ``perm_e[b*G:(b+1)*G]`` and data-parallel rank r
takes its contiguous share ``[r*G/dp:(r+1)*G/dp]``; the incomplete last global batch of each epoch
is left out. Everything follows from one number, the global consumed_samples, so it is the whole
checkpointed state.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import torch

from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


class GlobalBatchSampler:
    """Yields this data-parallel rank's dataset indices, one global batch at a time.

    A batch is *taken* when next_batch returns it (or epoch_batches yields it), and taking it
    advances consumed_samples by the global batch size. A step-based trainer takes a batch, trains
    on it, and may then checkpoint state_dict(); a run resumed from that checkpoint takes the next
    batch, wherever in which epoch it falls::

        for epoch in range(sampler.epoch, max_epochs):
            for indices in sampler.epoch_batches():      # resumes mid-epoch after load_state_dict
                batch = collate([dataset[i] for i in indices])
                ...                                      # train; may checkpoint or stop here

    The sampler is not a torch DataLoader ``batch_sampler``: a DataLoader with workers takes batches
    ahead of training, which would advance consumed_samples past what was trained on.
    """

    def __init__(self, num_samples: int, *, global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True) -> None:
        """Checks the sizes and logs how many samples each epoch uses.

        Args:
            num_samples: the dataset's length N.
            global_batch_size: G, samples (e.g. preference pairs) per optimizer step over all ranks.
            dp_rank: this rank r in the data-parallel group, 0 <= r < dp_size.
            dp_size: the data-parallel size; it must divide G.
            seed: epoch e is shuffled with seed + e.
            shuffle: False visits the samples in dataset order every epoch.

        Raises:
            ValueError: G is not positive or not divisible by dp_size, dp_rank is out of range, or
                N < G (not even one global batch).
        """
        if global_batch_size < 1 or dp_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"(global_batch_size={global_batch_size})")
        self._num_samples = num_samples
        self._global_batch_size = global_batch_size
        self._share = global_batch_size // dp_size
        self._dp_rank = dp_rank
        self._seed = seed
        self._shuffle = shuffle
        self._consumed_samples = 0
        self._perm_epoch = -1
        self._perm = torch.arange(0)
        log_rank0(logger, "sampler: %d samples, %d global batches of %d per epoch (%d samples per epoch, %d dropped)",
                  num_samples, self.batches_per_epoch, global_batch_size, self.samples_per_epoch,
                  num_samples - self.samples_per_epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Complete global batches in one epoch."""
        return self._num_samples // self._global_batch_size

    @property
    def samples_per_epoch(self) -> int:
        """Samples one epoch uses: batches_per_epoch * G (the incomplete last batch left out)."""
        return self.batches_per_epoch * self._global_batch_size

    @property
    def consumed_samples(self) -> int:
        """Samples taken so far over all ranks and epochs (a multiple of the global batch size)."""
        return self._consumed_samples

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        return self._consumed_samples // self.samples_per_epoch

    def next_batch(self) -> list[int]:
        """Takes the next global batch, crossing into the next epoch if needed.

        Returns:
            This rank's share: G / dp_size dataset indices.
        """
        epoch, offset = divmod(self._consumed_samples, self.samples_per_epoch)
        start = offset + self._dp_rank * self._share
        indices = self._permutation(epoch)[start:start + self._share].tolist()
        self._consumed_samples += self._global_batch_size
        return indices

    def epoch_batches(self) -> Iterator[list[int]]:
        """Takes the remaining global batches of the current epoch, one per iteration.

        Yields:
            This rank's share of each batch, G / dp_size dataset indices.
        """
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The resume state: ``{"consumed_samples": int}``; epoch and position follow from it."""
        return {"consumed_samples": self._consumed_samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores consumed_samples, so the next batch is the one an uninterrupted run takes next.

        Raises:
            ValueError: consumed_samples is negative or not a multiple of the global batch size
                (the run that saved it used another global_batch_size).
        """
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self._global_batch_size:
            raise ValueError(f"consumed_samples={consumed} is not a non-negative multiple of "
                             f"global_batch_size={self._global_batch_size}")
        self._consumed_samples = consumed

    def _permutation(self, epoch: int) -> torch.Tensor:
        """perm_epoch [N]: the order of epoch `epoch` (cached for the current epoch)."""
        if epoch != self._perm_epoch:
            if self._shuffle:
                generator = torch.Generator().manual_seed(self._seed + epoch)
                self._perm = torch.randperm(self._num_samples, generator=generator)
            else:
                self._perm = torch.arange(self._num_samples)
            self._perm_epoch = epoch
        return self._perm
