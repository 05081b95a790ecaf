"""The reference's sequence log-probs computed once before training and cached on disk.

One pass over a dataset with the initial weights (each data-parallel rank scores its share, the
results are summed into every rank) gives each example's Σ_t log π_ref over its chosen and rejected
responses; these travel with the data from then on (`ref_logps` in the batch), so training steps
run no reference at all.

The cache file `<cache_dir>/<name>-<key>.pt` is keyed by the dataset's fingerprint (every example's
token ids: data content, tokenizer and length policy), the weights' fingerprint and the compute
dtype; it holds a checksum of its values. A file with another key is another cache; a file whose
checksum or shape does not match is reported and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, ContextManager, Protocol, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_aligner.engines.base import Engine
from nemo_aligner.types import ROWS_PER_PAIR, Batch, chosen_rows, rejected_rows

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


class ScoredDataset(Protocol):
    """A pair dataset the pass can score: examples by index, a fingerprint, and a place for the results."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...

    def attach_reference_logps(self, logps: torch.Tensor) -> None: ...


class PrecomputedReference:
    """ReferencePolicy whose values come with the batch (`ref_logps`, [rows]), from precompute_into."""

    name = "precomputed"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def sequence_logps(self, batch: Batch, split: Callable[[Batch], Sequence[Batch]]) -> torch.Tensor:
        if "ref_logps" not in batch:
            raise RuntimeError("a batch carries no precomputed reference log-probs: its dataset was not passed "
                               "through PrecomputedReference.precompute_into before training")
        return batch["ref_logps"].float()

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        raise RuntimeError("the precomputed reference keeps per-sequence sums, not per-token log-probs; "
                           "choose the resident or swap reference strategy for per-token values")

    def active(self) -> ContextManager[None]:
        raise RuntimeError("the precomputed reference holds no weights to compute or generate with (SPIN needs the "
                           "resident or swap strategy)")

    def become_current_policy(self) -> None:
        raise RuntimeError("the precomputed reference cannot become the current policy (SPIN needs the resident or "
                           "swap strategy)")

    def save(self, path: str) -> None:
        raise RuntimeError("the precomputed reference lives in its cache, not in checkpoints")

    def load(self, path: str) -> None:
        raise RuntimeError("the precomputed reference lives in its cache, not in checkpoints")

    def precompute_into(self, dataset: ScoredDataset, *, name: str, cache_dir: str, pairs_per_forward: int,
                        collate: Callable[[list[dict[str, Any]]], Batch],
                        score: Callable[[Batch], torch.Tensor]) -> None:
        """Attach every example's reference log-probs to `dataset`, from the cache or one scoring pass.

        Must run while the network holds the reference weights (DPO: the initial model, before a resume
        loads trained weights). `score` maps a collated batch to its rows' Σ_t log π over the scored
        positions; every rank runs the same number of forwards.
        """
        key = hashlib.sha256(f"{CACHE_VERSION}|{dataset.fingerprint()}|{self.engine.weights_fingerprint()}|"
                             f"{self.engine.compute_dtype}".encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, f"{name}-{key}.pt")
        logps = _read_cache(path, key, len(dataset))
        if logps is None:
            logps = self._score(dataset, name, pairs_per_forward, collate, score)
            if self.engine.data_parallel.rank == 0 and _rank_in_model_parallel_group(self.engine) == 0:
                _write_cache(path, key, logps)
            logger.info("reference log-probs of %s (%d pairs) computed and cached in %s", name, len(dataset), path)
        else:
            logger.info("reference log-probs of %s (%d pairs) read from the cache %s", name, len(dataset), path)
        dataset.attach_reference_logps(logps)

    @torch.no_grad()
    def _score(self, dataset: ScoredDataset, name: str, pairs_per_forward: int,
               collate: Callable[[list[dict[str, Any]]], Batch], score: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
        """[N, 2] (chosen, rejected) sums; rank r scores examples r, r + dp, ...; summed over ranks."""
        dp = self.engine.data_parallel
        mine = list(range(dp.rank, len(dataset), dp.size))
        per_rank = -(-len(dataset) // dp.size)
        logps = torch.zeros(len(dataset), ROWS_PER_PAIR, dtype=torch.float64, device=self.engine.device)
        starts = range(0, per_rank, pairs_per_forward)
        for start in tqdm(starts, desc=f"reference log-probs of {name}", unit="batch", disable=dp.rank != 0):
            indices = mine[start : start + pairs_per_forward]
            # every rank runs as many forwards (they are collective); a rank short of examples repeats one
            rows = score(collate([dataset[i] for i in (indices or mine[:1] or [0])])).double()
            if indices:
                logps[indices, 0], logps[indices, 1] = chosen_rows(rows), rejected_rows(rows)
        return self.engine.reduce_data_parallel(logps, "sum").float().cpu()


def _rank_in_model_parallel_group(engine: Engine) -> int:
    group = engine.model_parallel_group
    return dist.get_rank(group) if group is not None else 0


def _checksum(logps: torch.Tensor) -> str:
    return hashlib.sha256(logps.contiguous().numpy().tobytes()).hexdigest()


def _read_cache(path: str, key: str, count: int) -> torch.Tensor | None:
    """The cached values, or None (with a warning when a file was there but unusable)."""
    if not os.path.isfile(path):
        return None
    try:
        stored = torch.load(path, weights_only=True)
        logps = stored["logps"]
        ok = (stored["version"] == CACHE_VERSION and stored["key"] == key and tuple(logps.shape) == (count, ROWS_PER_PAIR)
              and stored["checksum"] == _checksum(logps) and bool(torch.isfinite(logps).all()))
    except Exception as err:  # a torn or foreign file: any read error means "not usable"
        logger.warning("reference log-prob cache %s is unreadable (%s: %s); computing it again", path,
                       type(err).__name__, err)
        return None
    if not ok:
        logger.warning("reference log-prob cache %s does not match its key, size or checksum; computing it again", path)
        return None
    return logps


def _write_cache(path: str, key: str, logps: torch.Tensor) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"version": CACHE_VERSION, "key": key, "logps": logps, "checksum": _checksum(logps)}, tmp)
    os.replace(tmp, path)
