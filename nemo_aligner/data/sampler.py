"""Global-batch sampling over data-parallel ranks that resumes exactly from consumed_samples.

Epoch e visits the dataset in the order perm_e (a permutation seeded with seed + e, or the identity
without shuffling). Global batch b of epoch e is ``perm_e[b*G:(b+1)*G]`` and data-parallel rank r
takes its contiguous share ``[r*G/dp:(r+1)*G/dp]``, or, given the examples' token counts, the share
of a token-balanced split of the global batch (every rank still G/dp examples; see balanced_shares);
the incomplete last global batch of each epoch is left out. Everything follows from one number, the
global consumed_samples, so it is the whole checkpointed state.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Sequence

import torch

from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)

GROUP_BATCHES = 50  # global batches sorted by length together under group_by_length (as HF's megabatches)


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
                 shuffle: bool = True, token_counts: Sequence[int] | None = None, balance_ranks: bool = False,
                 micro_batch_size: int | None = None, group_by_length: bool = False) -> None:
        """Checks the sizes and logs how many samples each epoch uses.

        Args:
            num_samples: the dataset's length N.
            global_batch_size: G, samples (e.g. preference pairs) per optimizer step over all ranks.
            dp_rank: this rank r in the data-parallel group, 0 <= r < dp_size.
            dp_size: the data-parallel size; it must divide G.
            seed: epoch e is shuffled with seed + e.
            shuffle: False visits the samples in dataset order every epoch.
            token_counts: the tokens each sample costs (needed by the next two).
            balance_ranks: split every global batch over the ranks so that their token sums are as
                even as balanced_shares makes them (packing: rows of about equal length on every rank).
            micro_batch_size: with balance_ranks, also order each rank's share so that its consecutive
                runs of this many samples (its micro-batches) carry about equal tokens.
            group_by_length: put samples of similar length in the same global batches (each run of
                GROUP_BATCHES global batches of the epoch's order sorted by length, the batches then
                shuffled), so that a batch padded to its longest sample carries little padding.

        Raises:
            ValueError: G is not positive or not divisible by dp_size, dp_rank is out of range, or
                N < G (not even one global batch).
        """
        if global_batch_size < 1 or dp_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"the data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if (balance_ranks or group_by_length) and (token_counts is None or len(token_counts) != num_samples):
            raise ValueError("balance_ranks and group_by_length need token_counts, one per sample")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"(global_batch_size={global_batch_size})")
        self._num_samples = num_samples
        self._global_batch_size = global_batch_size
        self._share = global_batch_size // dp_size
        self._dp_size = dp_size
        self._dp_rank = dp_rank
        self._seed = seed
        self._shuffle = shuffle
        self._consumed_samples = 0
        self._token_counts = token_counts
        self._balance_ranks = balance_ranks
        self._micro_batch_size = micro_batch_size
        self._group_by_length = group_by_length
        # of the last batch taken, when balancing: the most tokens a rank got / the mean over ranks - 1
        self.token_imbalance: float | None = None
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
        global_batch = self._permutation(epoch)[offset:offset + self._global_batch_size].tolist()
        self._consumed_samples += self._global_batch_size
        if not self._balance_ranks:
            return global_batch[self._dp_rank * self._share:(self._dp_rank + 1) * self._share]
        shares = balanced_shares(global_batch, [self._token_counts[i] for i in global_batch], self._dp_size)
        tokens = [sum(self._token_counts[i] for i in share) for share in shares]
        self.token_imbalance = max(tokens) / (sum(tokens) / self._dp_size) - 1 if sum(tokens) else 0.0
        share, micro = shares[self._dp_rank], self._micro_batch_size
        if micro and len(share) % micro == 0 and len(share) > micro:
            share = [i for run in balanced_shares(share, [self._token_counts[i] for i in share], len(share) // micro)
                     for i in run]
        return share

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
            generator = torch.Generator().manual_seed(self._seed + epoch)
            if self._shuffle:
                self._perm = torch.randperm(self._num_samples, generator=generator)
            else:
                self._perm = torch.arange(self._num_samples)
            if self._group_by_length:
                self._perm = self._grouped_by_length(self._perm, generator)
            self._perm_epoch = epoch
        return self._perm

    def _grouped_by_length(self, order: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`order` with each run of GROUP_BATCHES global batches sorted by length (longest first), then
        those batches shuffled; the samples an epoch uses stay the same ones."""
        used, size = self.samples_per_epoch, self._global_batch_size
        counts = torch.tensor(self._token_counts)
        runs = []
        for start in range(0, used, GROUP_BATCHES * size):
            run = order[start:min(start + GROUP_BATCHES * size, used)]
            run = run[torch.sort(counts[run], descending=True, stable=True).indices]
            batches = run.view(-1, size)
            runs.append(batches[torch.randperm(len(batches), generator=generator)].reshape(-1))
        return torch.cat([*runs, order[used:]])


def balanced_shares(indices: list[int], tokens: list[int], parts: int) -> list[list[int]]:
    """Split `indices` into `parts` shares of equal size whose token sums are close: the longest sample
    first, each to the share with the fewest tokens that still has room (ties: the lower share).
    Deterministic, so every rank computes the same split; each share keeps the batch's order."""
    size = len(indices) // parts
    order = sorted(range(len(indices)), key=lambda k: (-tokens[k], k))
    sums, members = [0] * parts, [[] for _ in range(parts)]
    for k in order:
        share = min((p for p in range(parts) if len(members[p]) < size), key=lambda p: (sums[p], p))
        members[share].append(k)
        sums[share] += tokens[k]
    return [[indices[k] for k in sorted(share)] for share in members]
