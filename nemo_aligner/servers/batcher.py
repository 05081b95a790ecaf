"""Dynamic batching: items of concurrent requests are grouped into model calls of bounded size.

Requests wait in an asyncio queue. One worker task takes the oldest request, then keeps adding
queued requests until the batch holds `max_batch_size` items or `max_wait_ms` has passed since the
batch was opened; a request larger than the batch size is split over consecutive batches. The
scorer runs on a single worker thread (the model is not re-entrant), so the event loop keeps
accepting, validating and queueing requests while a batch is being scored, and those requests form
the next batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from nemo_aligner.servers.scorers import Scorer

logger = logging.getLogger(__name__)


class ScoringError(RuntimeError):
    """Scoring an item failed or gave a non-finite reward; the message names the item's index."""


@dataclass
class _Request:
    items: list[Any]
    future: asyncio.Future
    rewards: list[float] = field(default_factory=list)
    scheduled: int = 0  # items already put in a batch

    def __post_init__(self) -> None:
        self.rewards = [math.nan] * len(self.items)


@dataclass
class BatcherStats:
    """Counters shown by GET /health."""

    requests: int = 0  # requests answered with rewards
    items: int = 0  # items scored
    batches: int = 0  # model calls
    max_batch_items: int = 0  # the most items one model call held
    max_batch_requests: int = 0  # the most requests one model call served


class DynamicBatcher:
    """Queues requests and scores them in batches on one worker thread.

    Args:
        scorer: prepares and scores items.
        max_batch_size: items per model call.
        max_wait_ms: how long a batch waits for more requests once it holds one.
    """

    def __init__(self, scorer: Scorer, *, max_batch_size: int, max_wait_ms: float) -> None:
        self._scorer = scorer
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
        self._worker: asyncio.Task | None = None
        self.stats = BatcherStats()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="reward-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, items: list[Any]) -> list[float]:
        """Scores `items` (one request's, already prepared) and returns their rewards in order.

        Raises:
            ScoringError: an item raised in the scorer or got a non-finite reward.
        """
        request = _Request(items, asyncio.get_running_loop().create_future())
        await self._queue.put(request)
        return await request.future

    async def _next(self, timeout: float) -> _Request | None:
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Request | None = None  # a request split over batches, with items left to schedule
        while True:
            request = carry or await self._queue.get()
            carry = None
            deadline = loop.time() + self._max_wait_s
            batch: list[tuple[_Request, int, int]] = []  # (request, first item, end)
            size = 0
            while request is not None:
                if not request.future.done():  # a client that went away is skipped
                    take = min(len(request.items) - request.scheduled, self._max_batch_size - size)
                    batch.append((request, request.scheduled, request.scheduled + take))
                    request.scheduled += take
                    size += take
                    if request.scheduled < len(request.items):
                        carry = request
                        break
                if size >= self._max_batch_size:
                    break
                request = await self._next(deadline - loop.time())
            if batch:
                await self._execute(batch, size)

    async def _execute(self, batch: list[tuple[_Request, int, int]], size: int) -> None:
        items = [item for request, start, end in batch for item in request.items[start:end]]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._scorer.score_batch, items)
        except Exception as err:  # the whole model call failed: every request in it gets a 500
            logger.exception("scoring a batch of %d items failed", size)
            for request, _, _ in batch:
                _fail(request, f"scoring a batch of {size} items failed: {type(err).__name__}: {err}")
            return
        self._record(batch, size)
        offset = 0
        for request, start, end in batch:
            for index in range(start, end):
                _store(request, index, results[offset])
                offset += 1
            if end == len(request.items) and not request.future.done():
                request.future.set_result(request.rewards)
                self.stats.requests += 1

    def _record(self, batch: list[tuple[_Request, int, int]], size: int) -> None:
        self.stats.batches += 1
        self.stats.items += size
        self.stats.max_batch_items = max(self.stats.max_batch_items, size)
        self.stats.max_batch_requests = max(self.stats.max_batch_requests, len(batch))


def _store(request: _Request, index: int, result: float | Exception) -> None:
    if request.future.done():
        return
    if isinstance(result, Exception):
        _fail(request, f"item {index}: the reward function raised {type(result).__name__}: {result}")
    elif not math.isfinite(result):
        _fail(request, f"item {index}: the reward is {result}, not a finite number")
    else:
        request.rewards[index] = result


def _fail(request: _Request, message: str) -> None:
    if not request.future.done():
        request.future.set_exception(ScoringError(message))
