"""StepDataLoader: a dataset, a resumable global-batch sampler and a collate function as one
object that hands this rank its share of the next global batch."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from nemo_aligner.data.sampler import GlobalBatchSampler


class StepDataLoader:
    """Batches are built on demand in the training process, so `consumed_samples` never runs
    ahead of what was trained on (see GlobalBatchSampler). A Stateful through its sampler."""

    def __init__(self, dataset: Any, sampler: GlobalBatchSampler, collate: Callable[[list[Any]], Any]) -> None:
        self.dataset, self.sampler, self.collate = dataset, sampler, collate

    def next_batch(self) -> tuple[Any, list[int]]:
        """This rank's share of the next global batch, collated, and its dataset indices."""
        indices = self.sampler.next_batch()
        return self.collate([self.dataset[i] for i in indices]), indices

    def first_batches(self, limit: int) -> list[Any]:
        """The first `limit` batches of a pass from the start (validation; no shuffling wanted)."""
        self.sampler.load_state_dict({"consumed_samples": 0})
        return [self.next_batch()[0] for _ in range(min(limit, self.sampler.batches_per_epoch))]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
