"""Per-request dispatch for engines that batch in flight (TensorRT-LLM).

Such an engine re-forms its batch every iteration, so holding requests back to form a
micro-batch only wastes slots. :class:`InflightDispatcher` submits each request at once and
bounds how many are in the engine (backpressure: ``submit`` waits for a free slot). It has
the same ``submit`` → future-of-:class:`BatchOutcome` shape as the micro-batcher, so the
stream layer does not care which one it has; results complete (and are published) in
whatever order the engine finishes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from inference.errors import BatcherClosedError
from inference.types import BatchOutcome, Completion, GenerationRequest

logger = logging.getLogger(__name__)

RunOne = Callable[[GenerationRequest], Awaitable[Completion]]


class InflightDispatcher:
    """Submits every request to the engine at once, at most ``max_inflight`` at a time."""

    def __init__(
        self,
        run_one: RunOne,
        *,
        max_inflight: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self._run_one = run_one
        self.max_inflight = max_inflight
        self._slots = asyncio.Semaphore(max_inflight)
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.in_engine = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        """Take no more requests; wait for those in the engine."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def queued(self) -> int:
        return self.in_engine

    async def submit(self, request: GenerationRequest) -> asyncio.Future[BatchOutcome]:
        if self._closed:
            raise BatcherClosedError("the dispatcher is stopping")
        await self._slots.acquire()
        if self._closed:  # stopped while this waited for a slot
            self._slots.release()
            raise BatcherClosedError("the dispatcher is stopping")
        future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(request, future, self._clock()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def _run(
        self, request: GenerationRequest, future: asyncio.Future[BatchOutcome], queued: float
    ) -> None:
        self.in_engine += 1
        started = self._clock()
        try:
            if request.deadline is not None and started >= request.deadline:
                outcome = BatchOutcome(None, None, 0, started - queued, 0.0, expired=True)
            else:
                try:
                    completion = await self._run_one(request)
                    outcome = BatchOutcome(
                        completion,
                        None,
                        self.in_engine,
                        started - queued,
                        self._clock() - started,
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # stays with this request
                    outcome = BatchOutcome(
                        None, exc, self.in_engine, started - queued, self._clock() - started
                    )
            if not future.done():
                future.set_result(outcome)
        finally:
            self.in_engine -= 1
            self._slots.release()
