"""The bench's workload: the prompt set, arrival schedules and sweep plans (pure)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

_WORDS = (
    "river stone light window garden market signal paper winter engine silver forest "
    "harbor letter morning shadow copper valley station bridge candle orbit meadow "
    "lantern thunder ocean pencil marble rocket violet canyon island blanket crystal "
    "falcon ladder mirror planet saddle timber velvet wagon anchor basket cactus dragon "
    "feather glacier hammer jungle kettle lemon magnet needle olive pepper quartz ribbon "
    "spiral tunnel umbrella vessel whistle yellow zebra almond breeze cotton desert "
    "ember fabric granite horizon ivory jacket kernel lagoon meteor nectar oyster prism"
).split()


def make_prompts(n: int, words: Sequence[int], seed: int = 7) -> list[str]:
    """``n`` deterministic prompts; lengths cycle through ``words`` (in words)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        length = words[i % len(words)]
        body = " ".join(rng.choice(_WORDS) for _ in range(max(length - 4, 1)))
        prompts.append(f"Summarize in one sentence: {body}" if length > 4 else body)
    return prompts


def schedule_offsets(n: int, rate: float | None) -> list[float]:
    """Intended send time of each request, in seconds after the start (open loop)."""
    if rate is None:
        return [0.0] * n
    return [i / rate for i in range(n)]


def poisson_offsets(n: int, rate: float, seed: int = 7) -> list[float]:
    """Send times (s after the start) of ``n`` Poisson arrivals at ``rate`` requests/s:
    exponential gaps with mean ``1 / rate``, the first request at 0 (seeded: the same
    options give the same schedule)."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError("rate must be > 0 requests/s")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        offsets.append(t)
    return offsets


def level_count(requests: int, rate: float, max_s: float, least: int = 4) -> int:
    """Requests of one load level: ``requests``, fewer when at ``rate`` they would arrive
    over more than ``max_s`` seconds, never fewer than ``least`` (or ``requests``)."""
    fit = math.floor(rate * max_s) if rate > 0 and math.isfinite(rate) else requests
    return max(min(requests, least), min(requests, fit))


async def paced(
    n: int,
    rate: float | None,
    *,
    offsets: Sequence[float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    yield_every: int = 64,
) -> AsyncIterator[int]:
    """Yield 0..n-1, each no earlier than its scheduled time (``offsets[i]`` seconds after
    the start when given, else ``i / rate``; all at once without either). Requests that
    are overdue go out at once (open loop: a slow consumer does not slow the arrivals
    down), and every ``yield_every`` requests the loop gets a turn so readers are not
    starved."""
    if offsets is not None and len(offsets) != n:
        raise ValueError("one offset per request")
    start = clock()
    for i in range(n):
        due = offsets[i] if offsets is not None else (i / rate if rate is not None else None)
        if due is not None:
            delay = start + due - clock()
            if delay > 0:
                await sleep(delay)
            elif i % yield_every == yield_every - 1:
                await sleep(0)
        elif i % yield_every == yield_every - 1:
            await sleep(0)
        yield i


def sweep_plan(sizes: Sequence[int], requests: int | None) -> list[tuple[int, int]]:
    """(batch size, requests) per sweep point: whole batches only."""
    plan = []
    for size in sizes:
        want = requests if requests else max(2 * size, 6)
        plan.append((size, max(1, math.ceil(want / size)) * size))
    return plan


def rated_count(limit: int, rate: float, seconds: float = 20.0) -> int:
    """Requests for a rate-limited pass: at most ``limit``, at most ~``seconds`` long."""
    return max(1, min(limit, max(500, int(rate * seconds))))
