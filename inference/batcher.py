"""The micro-batcher: requests in, batches to an engine, one future per request out.

Pure asyncio, no Kafka. What it promises:

* ``submit`` waits while ``max_queue`` requests are queued or running (backpressure: the
  caller slows down instead of a queue growing without bound);
* a batch holds at most ``max_batch_size`` requests and costs at most ``max_batch_tokens``
  (see *Token budget*); one request over the budget runs alone;
* higher ``priority`` goes first; a request past its deadline is not run (``expired``;
  the whole queue is checked each time a batch is formed);
* one request's failure stays with it: if the engine raises for a whole batch, each
  request is retried alone, and the loop itself survives anything a batch, a request or
  the clock does.

**Token budget.** The torch backend left-pads a batch to its longest prompt and decodes
every row until the largest output budget is spent, so what a batch really computes is
``len(batch) * (longest prompt + largest max_new_tokens)``. With ``padded_budget=True``
(the default) that is the cost held to ``max_batch_tokens``; with ``False`` the cost is
the plain sum of ``len(prompt_ids) + max_new_tokens``. :func:`batch_token_cost` is the
function either way.

**Length grouping.** When more is queued than one batch can take, the batch is formed
around the *head* of the queue (highest priority, then oldest), which is always in it, so
grouping starves nothing: every batch takes its head, and a request is the head once what
is ahead of it (higher priority, or older in its class) has run.
The other slots go to the queued requests whose prompt length is closest to the head's,
the head's priority class first, then the next class down, and so on; a request that
does not fit (size or budget) is skipped for the next one. Adding a request never lowers
a batch's cost, so a higher-priority request left out could not have fitted in place of
any lower-priority one taken: a lower class never displaces a higher one. Batches come
out length-homogeneous, which wastes little padding. :func:`select_batch` is the policy.

**Adaptive wait.** The batcher keeps an EWMA of the gap between submits on its clock
(:class:`ArrivalRate`; the rate is one over the gap, and one over the time since the last
arrival once that is longer, so a stream that stopped reads as slow). A partial batch's
window runs from its oldest request: at least ``min_wait_s`` (default 0), at most
``max_wait_s``. Within it the batch starts as soon as fewer than one more arrival is
expected before the cap (``rate * time left < 1``), since waiting then buys nothing on
average. So an idle or trickling stream is served at once (a lone request does not sit out
``max_wait_s`` for company that is not coming), while a fast stream waits up to the cap for
a fuller batch. A batch starts at once, whatever the window, when the queue already holds
``max_batch_size`` requests or a full budget (lag built up: requests that queued while the
engine was busy have waited already), or when the batcher is stopping. Gaps are counted
up to ``max_wait_s`` (longer ones all mean "idle"; counted in full, one long pause would
take many arrivals to forget). With ``min_wait_s == max_wait_s`` the window is fixed:
every partial batch waits ``max_wait_s`` from its oldest request, as before this policy.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import operator
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from inference.errors import BatcherClosedError, EngineError
from inference.types import BatchOutcome, Completion, GenerationRequest

logger = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[GenerationRequest]], Awaitable[list[Completion | BaseException]]]

ARRIVAL_EWMA_ALPHA = 0.2  # weight of the newest gap in the arrival estimate


# -- the policy, as pure functions -------------------------------------------------------


def batch_token_cost(requests: Iterable[GenerationRequest], *, padded: bool = True) -> int:
    """What a batch of ``requests`` costs against ``max_batch_tokens``.

    ``padded``: ``len * (longest prompt + largest max_new_tokens)``, what left-padded
    generation computes; otherwise the sum of each request's ``token_cost``. 0 when empty.
    """
    return _cost([(len(r.prompt_ids), r.sampling.max_new_tokens) for r in requests], padded)


def _cost(shapes: Sequence[tuple[int, int]], padded: bool) -> int:
    if not shapes:
        return 0
    if padded:
        return len(shapes) * (max(p for p, _ in shapes) + max(n for _, n in shapes))
    return sum(p + n for p, n in shapes)


def select_batch(
    queue: Sequence[GenerationRequest],
    *,
    max_batch_size: int,
    max_batch_tokens: int,
    padded: bool = True,
) -> list[int]:
    """The next batch from ``queue`` (in arrival order), as indices into it.

    The head (highest priority, earliest arrival) is always chosen; the rest are filled
    by priority class, closest prompt length to the head's first (then arrival). Indices
    come back in dispatch order: priority, then arrival.
    """
    order = sorted(range(len(queue)), key=lambda i: -queue[i].priority)  # stable: arrival
    shapes = [
        (queue[i].priority, len(queue[i].prompt_ids), queue[i].sampling.max_new_tokens)
        for i in order
    ]
    return [order[k] for k in _select(shapes, max_batch_size, max_batch_tokens, padded)]


def _select(
    items: Sequence[tuple[int, int, int]], max_batch_size: int, max_batch_tokens: int, padded: bool
) -> list[int]:
    """``items``: (priority, prompt length, max_new_tokens) in dispatch order, head first.

    Returns the chosen positions, ascending.
    """
    if not items:
        return []
    _, head_len, head_new = items[0]
    candidates = sorted(
        range(1, len(items)), key=lambda i: (-items[i][0], abs(items[i][1] - head_len), i)
    )
    chosen = [0]
    longest, most_new, total = head_len, head_new, head_len + head_new
    for i in candidates:
        if len(chosen) >= max_batch_size:
            break
        _, prompt_len, max_new = items[i]
        n = len(chosen) + 1
        if padded:
            cost = n * (max(longest, prompt_len) + max(most_new, max_new))
        else:
            cost = total + prompt_len + max_new
        if cost > max_batch_tokens:
            continue  # does not fit this batch; it keeps its place in the queue
        chosen.append(i)
        longest, most_new = max(longest, prompt_len), max(most_new, max_new)
        total += prompt_len + max_new
    chosen.sort()
    return chosen


class ArrivalRate:
    """Smoothed arrival rate from submit times: an EWMA of the gap between arrivals.

    The gap, not the rate, is averaged (arrivals at the same instant would make a rate
    sample infinite). ``horizon_s`` caps each gap sample. ``rate(now)`` is one over the
    larger of the mean gap and the time since the last arrival, so a pause counts as soon
    as it is longer than usual. Pure arithmetic on the times it is given.
    """

    def __init__(self, alpha: float = ARRIVAL_EWMA_ALPHA, horizon_s: float | None = None) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.horizon_s = horizon_s
        self.mean_gap_s: float | None = None  # None until two arrivals have been seen
        self.last_at: float | None = None

    def observe(self, at: float) -> None:
        """One arrival at time ``at``."""
        if self.last_at is not None:
            gap = max(0.0, at - self.last_at)
            if self.horizon_s is not None:
                gap = min(gap, self.horizon_s)
            if self.mean_gap_s is None:
                self.mean_gap_s = gap
            else:
                self.mean_gap_s += self.alpha * (gap - self.mean_gap_s)
            at = max(at, self.last_at)
        self.last_at = at

    def rate(self, now: float) -> float:
        """Requests per second at ``now``; 0 while unknown (fewer than two arrivals)."""
        if self.mean_gap_s is None or self.last_at is None:
            return 0.0
        gap = max(self.mean_gap_s, now - self.last_at)
        return math.inf if gap <= 0 else 1.0 / gap

    def expected(self, now: float, until: float) -> float:
        """Arrivals expected between ``now`` and ``until`` at the current rate."""
        window = until - now
        return 0.0 if window <= 0 else window * self.rate(now)

    def quiet_from(self, until: float) -> float:
        """The time from which fewer than one arrival is expected before ``until``.

        ``expected(t, until) = (until - t) / max(mean_gap, t - last)`` drops below 1 once
        ``t > until - mean_gap`` or ``t > (last + until) / 2``, whichever comes first.
        ``-inf`` while the rate is unknown (nothing is expected).
        """
        if self.mean_gap_s is None or self.last_at is None:
            return -math.inf
        return min(until - self.mean_gap_s, (self.last_at + until) / 2)


# -- the batcher ----------------------------------------------------------------------------


@dataclass(order=True)
class _Entry:
    sort_key: tuple[int, int]  # (-priority, arrival sequence)
    request: GenerationRequest = field(compare=False)
    future: asyncio.Future[BatchOutcome] = field(compare=False)
    queued_at: float = field(compare=False)
    # Read once at submit, so a malformed request fails its caller, never the loop.
    prompt_len: int = field(compare=False)
    max_new: int = field(compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (-self.sort_key[0], self.prompt_len, self.max_new)


class MicroBatcher:
    """Forms batches for one engine and runs them one at a time."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int = 16,
        max_batch_tokens: int = 8192,
        max_wait_s: float = 0.02,
        min_wait_s: float = 0.0,
        padded_budget: bool = True,
        max_queue: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_batch_tokens < 1 or max_queue < 1:
            raise ValueError("batch size, token budget and queue must be >= 1")
        if not 0 <= min_wait_s <= max_wait_s:
            raise ValueError("waits must satisfy 0 <= min_wait_s <= max_wait_s")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.min_wait_s = min_wait_s
        self.padded_budget = padded_budget
        self._clock = clock
        self._arrivals = ArrivalRate(horizon_s=max_wait_s if max_wait_s > 0 else None)
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._room = asyncio.Semaphore(max_queue)
        self._arrived = asyncio.Event()
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
        priority = operator.index(request.priority)
        prompt_len = len(request.prompt_ids)
        max_new = operator.index(request.sampling.max_new_tokens)
        await self._room.acquire()
        try:
            if self._closed:
                raise BatcherClosedError("the batcher is stopping")
            now = self._clock()
            future: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(lambda _f: self._room.release())
        entry = _Entry((-priority, next(self._seq)), request, future, now, prompt_len, max_new)
        heapq.heappush(self._heap, entry)
        self._arrivals.observe(now)
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
            try:
                await self._wait_for_fill()
            except Exception:  # a broken clock must not stop the batcher: go now
                logger.exception("batch wait failed; dispatching at once")
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
            delay = self._start_at(oldest) - self._clock()
            if delay <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), delay)
            except TimeoutError:
                return

    def _start_at(self, oldest: float) -> float:
        """When a partial batch whose oldest request came at ``oldest`` should start."""
        cap = oldest + self.max_wait_s
        floor = oldest + self.min_wait_s
        return min(cap, max(floor, self._arrivals.quiet_from(cap)))

    def _full(self) -> bool:
        if len(self._heap) >= self.max_batch_size:
            return True
        shapes = [(e.prompt_len, e.max_new) for e in self._heap]
        return _cost(shapes, self.padded_budget) >= self.max_batch_tokens

    def _take_batch(self) -> list[_Entry]:
        try:
            return self._take_grouped()
        except Exception:
            logger.exception("batch selection failed; running the head of the queue alone")
            return self._take_head()

    def _take_grouped(self) -> list[_Entry]:
        now = self._clock()
        live: list[_Entry] = []
        for entry in sorted(self._heap):
            if entry.future.done():  # cancelled by its owner
                continue
            deadline = entry.request.deadline
            if deadline is not None and now >= deadline:
                entry.future.set_result(
                    BatchOutcome(None, None, 0, now - entry.queued_at, 0.0, expired=True)
                )
                continue
            live.append(entry)
        picked = _select(
            [e.shape for e in live], self.max_batch_size, self.max_batch_tokens, self.padded_budget
        )
        taken = set(picked)
        # ``live`` is sorted, so what stays is a valid heap as it is.
        self._heap = [e for i, e in enumerate(live) if i not in taken]
        return [live[i] for i in picked]

    def _take_head(self) -> list[_Entry]:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not entry.future.done():
                return [entry]
        return []

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
