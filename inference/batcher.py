"""The micro-batcher: requests in, batches to an engine, one future per request out.

Pure asyncio, no Kafka. What it promises:

* ``submit`` waits while ``max_queue`` requests are queued or running (backpressure: the
  caller slows down instead of a queue growing without bound);
* a batch holds at most ``max_batch_size`` requests and ``max_batch_tokens`` tokens
  (prompt + output budget); one request larger than the budget runs alone;
* a batch starts when it is full or when its oldest request has waited ``max_wait_s``
  (so the wait shrinks to nothing under load: requests that queued while the engine was
  busy have already waited);
* higher ``priority`` goes first; a request past its deadline is not run (``expired``);
* one request's failure stays with it: if the engine raises for a whole batch, each
  request is retried alone, and the loop itself survives anything a batch does.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from inference.errors import BatcherClosedError, EngineError
from inference.types import BatchOutcome, Completion, GenerationRequest

logger = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[GenerationRequest]], Awaitable[list[Completion | BaseException]]]


@dataclass(order=True)
class _Entry:
    sort_key: tuple[int, int]
    request: GenerationRequest = field(compare=False)
    future: asyncio.Future[BatchOutcome] = field(compare=False)
    queued_at: float = field(compare=False)


class MicroBatcher:
    """Forms batches for one engine and runs them one at a time."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.02,
        max_queue: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("batch size, token budget and queue must be >= 1; wait >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._room = asyncio.Semaphore(max_queue)
        self._arrived = asyncio.Event()
        self._queued_tokens = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_run = 0

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop taking requests, finish the queue, then stop the loop."""
        self._closed = True
        self._arrived.set()
        if self._task is not None:
            await self._task
            self._task = None

    # -- intake ------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._heap)

    async def submit(self, request: GenerationRequest) -> asyncio.Future[BatchOutcome]:
        """Queue a request; waits while the batcher is full. Returns its outcome future."""
        if self._closed:
            raise BatcherClosedError("the batcher is stopping")
        await self._room.acquire()
        if self._closed:
            self._room.release()
            raise BatcherClosedError("the batcher is stopping")
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _f: self._room.release())
        entry = _Entry((-request.priority, next(self._seq)), request, future, self._clock())
        heapq.heappush(self._heap, entry)
        self._queued_tokens += request.token_cost
        self._arrived.set()
        return future

    # -- the loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._heap:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._wait_for_fill()
            batch = self._take_batch()
            if batch:
                try:
                    await self._run(batch)
                except Exception:  # the loop never dies from a batch
                    logger.exception("batch of %d failed outside the engine", len(batch))
                    self._fail_unresolved(batch, EngineError("internal batching error"))

    async def _wait_for_fill(self) -> None:
        oldest = min(e.queued_at for e in self._heap)
        while not self._closed and not self._full():
            remaining = oldest + self.max_wait_s - self._clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _full(self) -> bool:
        return (
            len(self._heap) >= self.max_batch_size or self._queued_tokens >= self.max_batch_tokens
        )

    def _take_batch(self) -> list[_Entry]:
        now = self._clock()
        batch: list[_Entry] = []
        tokens = 0
        skipped: list[_Entry] = []
        while self._heap and len(batch) < self.max_batch_size:
            entry = heapq.heappop(self._heap)
            cost = entry.request.token_cost
            if entry.future.done():  # cancelled by its owner
                self._queued_tokens -= cost
                continue
            deadline = entry.request.deadline
            if deadline is not None and now >= deadline:
                self._queued_tokens -= cost
                entry.future.set_result(
                    BatchOutcome(None, None, 0, now - entry.queued_at, 0.0, expired=True)
                )
                continue
            if batch and tokens + cost > self.max_batch_tokens:
                skipped.append(entry)  # does not fit this batch; first in line for the next
                continue
            self._queued_tokens -= cost
            tokens += cost
            batch.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return batch

    async def _run(self, batch: list[_Entry]) -> None:
        started = self._clock()
        requests = [e.request for e in batch]
        outcomes = await self._call_engine(requests)
        inference_s = self._clock() - started
        self.batches_run += 1
        for entry, outcome in zip(batch, outcomes, strict=True):
            if entry.future.done():
                continue
            completion = outcome if isinstance(outcome, Completion) else None
            error = None if completion is not None else outcome
            entry.future.set_result(
                BatchOutcome(
                    completion=completion,
                    error=error,
                    batch_size=len(batch),
                    batch_wait_s=started - entry.queued_at,
                    inference_s=inference_s,
                )
            )

    async def _call_engine(
        self, requests: list[GenerationRequest]
    ) -> list[Completion | BaseException]:
        failure: Exception
        try:
            outcomes = list(await self._run_batch(requests))
            if len(outcomes) != len(requests):
                raise EngineError(
                    f"engine returned {len(outcomes)} outcomes for {len(requests)} requests"
                )
            return [_as_outcome(o) for o in outcomes]
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the loop itself is being cancelled
            # A cancellation inside the engine (not of this loop) is a failed batch; letting
            # it propagate would end the loop and leave every later request unanswered.
            failure = EngineError("the engine call was cancelled")
            failure.__cause__ = cancelled
        except Exception as exc:
            failure = exc
        if len(requests) == 1:
            return [failure]
        logger.warning(
            "batch of %d failed (%s); retrying its requests one by one", len(requests), failure
        )
        isolated: list[Completion | BaseException] = []
        for request in requests:
            isolated.extend(await self._call_engine([request]))
        return isolated

    @staticmethod
    def _fail_unresolved(batch: list[_Entry], error: BaseException) -> None:
        for entry in batch:
            if not entry.future.done():
                entry.future.set_result(BatchOutcome(None, error, len(batch), 0.0, 0.0))


def _as_outcome(value: object) -> Completion | BaseException:
    if isinstance(value, Completion | BaseException):
        return value
    return EngineError(f"engine returned {type(value).__name__}, not a Completion")
