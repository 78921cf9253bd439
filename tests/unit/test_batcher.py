"""MicroBatcher: batch limits, length grouping, adaptive waiting, priority, expiry, failure
isolation, backpressure.

The engine here is a fake ``run_batch`` callable (the batcher is pure asyncio logic); it
records every batch it is handed and answers each request with its own id, so a mix-up of
outcomes between requests shows.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.batcher import ArrivalRate, MicroBatcher, batch_token_cost, select_batch
from inference.errors import BatcherClosedError, EngineError
from inference.types import BatchOutcome, Completion, GenerationRequest, Sampling

WAIT = 5.0  # generous upper bound for "eventually": only a hang or a lost wake-up reaches it


def req(
    rid: str,
    *,
    prompt_len: int = 1,
    max_new: int = 1,
    priority: int = 0,
    deadline: float | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt=rid,
        sampling=Sampling(max_new_tokens=max_new),
        priority=priority,
        prompt_ids=[7] * prompt_len,
        deadline=deadline,
    )


def completion_for(r: GenerationRequest) -> Completion:
    return Completion(
        text=f"out:{r.request_id}",
        finish_reason="length",
        prompt_tokens=len(r.prompt_ids),
        completion_tokens=r.sampling.max_new_tokens,
    )


class FakeEngine:
    """Records the batches it is given; answers each request with ``out:<id>``.

    ``fail_if(request)`` true for any request of a batch makes the whole batch raise (the
    "poison" request); ``gate`` (when set up) holds every batch until it is opened.
    """

    def __init__(
        self,
        fail_if: Callable[[GenerationRequest], bool] = lambda r: False,
        gate: asyncio.Event | None = None,
        watch: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.batches: list[list[str]] = []  # every call, in order
        self.succeeded: list[list[str]] = []  # calls that returned normally
        self.fail_if = fail_if
        self.gate = gate
        self.watch = watch  # called with each batch's ids as the call begins
        self.started = asyncio.Event()

    async def __call__(
        self, batch: Sequence[GenerationRequest]
    ) -> list[Completion | BaseException]:
        ids = [r.request_id for r in batch]
        self.batches.append(ids)
        if self.watch is not None:
            self.watch(ids)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if any(self.fail_if(r) for r in batch):
            raise ValueError(f"poisoned batch {ids}")
        self.succeeded.append(ids)
        return [completion_for(r) for r in batch]


async def outcomes(futures: Sequence[asyncio.Future[BatchOutcome]]) -> list[BatchOutcome]:
    return list(await asyncio.wait_for(asyncio.gather(*futures), WAIT))


async def submit_all(
    batcher: MicroBatcher, requests: Sequence[GenerationRequest]
) -> list[asyncio.Future[BatchOutcome]]:
    return [await batcher.submit(r) for r in requests]


async def stop(batcher: MicroBatcher, timeout: float = WAIT) -> None:
    await asyncio.wait_for(batcher.stop(), timeout)


def flat(batches: list[list[str]]) -> list[str]:
    return [rid for batch in batches for rid in batch]


class FakeClock:
    """A clock that moves only when told. The batcher hands its waits to asyncio in real
    seconds, so a test that sets a long window in clock seconds sees a wrong wait as a
    timeout, never as a slow pass."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def settle(rounds: int = 20) -> None:
    """Let the batcher's loop catch up with what was just submitted (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def assert_grouped_choice(
    chosen: Sequence[GenerationRequest],
    left: Sequence[GenerationRequest],
    rank: dict[str, int],
    *,
    max_batch_size: int,
    max_batch_tokens: int,
    padded: bool,
) -> None:
    """``chosen`` is the batch the grouping policy takes from ``chosen + left``.

    ``rank`` is arrival order. The head (highest priority, then earliest) is in the batch;
    the batch is within limits; and every request left out was either reached after the
    batch was already full or did not fit next to what the policy had chosen before it
    (the head, then by priority class, prompt length closest to the head's, arrival).
    Adding a request never lowers a batch's cost, so "did not fit" is checked against
    the chosen requests that come before it, a superset of what was there at its turn.
    """
    everyone = [*chosen, *left]
    head = min(everyone, key=lambda r: (-r.priority, rank[r.request_id]))
    assert head.request_id in {r.request_id for r in chosen}
    assert 1 <= len(chosen) <= max_batch_size
    cost = batch_token_cost(chosen, padded=padded)
    assert cost <= max_batch_tokens or len(chosen) == 1
    assert [r.request_id for r in chosen] == [
        r.request_id for r in sorted(chosen, key=lambda r: (-r.priority, rank[r.request_id]))
    ]

    def fill_key(r: GenerationRequest) -> tuple[int, int, int]:
        distance = abs(len(r.prompt_ids) - len(head.prompt_ids))
        return (-r.priority, distance, rank[r.request_id])

    for x in left:
        before = [head] + [b for b in chosen if b is not head and fill_key(b) < fill_key(x)]
        if len(before) == len(chosen) == max_batch_size:
            continue  # the batch was full before its turn
        assert batch_token_cost([*before, x], padded=padded) > max_batch_tokens, (
            f"{x.request_id} fits next to {[b.request_id for b in before]} but was left out"
        )


# -- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_batch_tokens": 0},
        {"max_queue": 0},
        {"max_wait_s": -0.001},
        {"min_wait_s": -0.001},
        {"min_wait_s": 0.5, "max_wait_s": 0.1},
    ],
)
def test_rejects_nonsense_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(FakeEngine(), **kwargs)  # type: ignore[arg-type]


# -- batch limits --------------------------------------------------------------------------


async def test_batches_respect_max_batch_size() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=3, max_batch_tokens=10_000, max_wait_s=0.02)
    futures = await submit_all(batcher, [req(f"r{i}") for i in range(7)])
    await batcher.start()  # everything is queued before the loop looks
    results = await outcomes(futures)
    await stop(batcher)

    assert [len(b) for b in engine.batches] == [3, 3, 1]
    assert flat(engine.batches) == [f"r{i}" for i in range(7)]
    assert [o.batch_size for o in results] == [3, 3, 3, 3, 3, 3, 1]
    assert batcher.batches_run == 3


async def test_batches_respect_max_batch_tokens() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=16, max_batch_tokens=10, max_wait_s=0.02)
    # token_cost = len(prompt_ids) + max_new_tokens = 2 + 2 = 4: two fit in 10, three do not.
    requests = [req(f"r{i}", prompt_len=2, max_new=2) for i in range(5)]
    assert requests[0].token_cost == 4
    futures = await submit_all(batcher, requests)
    await batcher.start()
    results = await outcomes(futures)
    await stop(batcher)

    assert [len(b) for b in engine.batches] == [2, 2, 1]
    assert all(o.ok for o in results)


async def test_token_cost_counts_the_output_budget() -> None:
    """A short prompt with a large max_new_tokens still fills the budget."""
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=16, max_batch_tokens=100, max_wait_s=0.02)
    requests = [req(f"r{i}", prompt_len=1, max_new=60) for i in range(3)]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    assert [len(b) for b in engine.batches] == [1, 1, 1]


async def test_request_over_the_token_budget_runs_alone() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=16, max_batch_tokens=10, max_wait_s=0.02)
    requests = [
        req("small-1", prompt_len=2, max_new=1),
        req("huge", prompt_len=20, max_new=5),
        req("small-2", prompt_len=2, max_new=1),
        req("small-3", prompt_len=2, max_new=1),
    ]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    results = await outcomes(futures)
    await stop(batcher)

    assert all(o.ok for o in results)
    huge_batches = [b for b in engine.batches if "huge" in b]
    assert huge_batches == [["huge"]]
    assert results[1].batch_size == 1
    assert sorted(flat(engine.batches)) == sorted(r.request_id for r in requests)


async def test_request_over_the_budget_at_the_head_does_not_take_company() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=16, max_batch_tokens=10, max_wait_s=0.02)
    requests = [req("huge", prompt_len=50, max_new=5, priority=1)] + [
        req(f"small-{i}") for i in range(3)
    ]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    assert engine.batches[0] == ["huge"]
    assert engine.batches[1] == ["small-0", "small-1", "small-2"]


# -- length grouping and the padded budget --------------------------------------------------


def test_padded_cost_is_rows_times_longest_prompt_plus_largest_output() -> None:
    short = req("short", prompt_len=10, max_new=5)
    long = req("long", prompt_len=2, max_new=20)
    assert batch_token_cost([]) == 0
    assert batch_token_cost([], padded=False) == 0
    assert batch_token_cost([short]) == batch_token_cost([short], padded=False) == 15
    # Left-padded to 10 prompt tokens, both rows decode 20: 2 * (10 + 20).
    assert batch_token_cost([short, long]) == 60
    assert batch_token_cost([short, long], padded=False) == 15 + 22
    assert batch_token_cost(iter([short, short, short])) == 3 * 15
    assert batch_token_cost([req("empty", prompt_len=0, max_new=1)] * 4) == 4


async def test_mixed_lengths_form_length_homogeneous_batches() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=4, max_batch_tokens=100_000, max_wait_s=0.01)
    lengths = [10, 500, 12, 480, 11, 505, 9, 490]
    requests = [req(f"len{n}", prompt_len=n) for n in lengths]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    results = await outcomes(futures)
    await stop(batcher)

    assert all(o.ok for o in results)
    # First come first served would have paired each short prompt with a long one.
    assert engine.batches == [
        ["len10", "len12", "len11", "len9"],
        ["len500", "len480", "len505", "len490"],
    ]
    by_id = {r.request_id: r for r in requests}
    grouped = sum(batch_token_cost(by_id[i] for i in b) for b in engine.batches)
    fifo = batch_token_cost(requests[:4]) + batch_token_cost(requests[4:])
    assert grouped < 0.6 * fifo


async def test_head_of_the_queue_is_in_the_batch_even_with_an_odd_length() -> None:
    """The oldest request runs in the next batch even if every other prompt is far from it."""
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=3, max_batch_tokens=100_000, max_wait_s=0.01)
    requests = [req("odd", prompt_len=300)] + [req(f"s{i}", prompt_len=5 + i) for i in range(5)]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    # The head takes the two closest to its own length with it (the longest shorts).
    assert engine.batches == [["odd", "s3", "s4"], ["s0", "s1", "s2"]]


async def test_grouping_keeps_to_priority_classes() -> None:
    """A same-length request of a lower class never takes a slot a higher one could have."""
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=3, max_batch_tokens=100_000, max_wait_s=0.01)
    requests = [
        req("low-same-1", prompt_len=10, priority=0),
        req("high-head", prompt_len=10, priority=2),
        req("low-same-2", prompt_len=10, priority=0),
        req("mid-far", prompt_len=400, priority=1),
        req("high-far", prompt_len=300, priority=2),
        req("low-near", prompt_len=11, priority=0),
    ]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    assert engine.batches == [
        ["high-head", "high-far", "mid-far"],
        ["low-same-1", "low-same-2", "low-near"],
    ]


async def test_a_higher_class_that_does_not_fit_leaves_its_slot_to_a_lower_one() -> None:
    """Within the budget: a lower class fills a slot the higher one could not use anyway."""
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=4, max_batch_tokens=40, max_wait_s=0.01)
    requests = [
        req("head", prompt_len=8, max_new=2, priority=1),  # alone: 10
        req("too-long", prompt_len=30, max_new=2, priority=1),  # with head: 2 * 32 = 64
        req("low", prompt_len=8, max_new=2, priority=0),  # with head: 2 * 10 = 20
    ]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    assert engine.batches == [["head", "low"], ["too-long"]]


@pytest.mark.parametrize("padded", [True, False])
async def test_padded_budget_splits_a_batch_a_summed_budget_takes_whole(padded: bool) -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(
        engine, max_batch_size=8, max_batch_tokens=40, max_wait_s=0.01, padded_budget=padded
    )
    requests = [req(f"short-{i}", prompt_len=1, max_new=1) for i in range(3)]
    requests.append(req("long", prompt_len=30, max_new=1))
    # Summed: 3 * 2 + 31 = 37 fits 40; padded: 4 * (30 + 1) = 124 does not.
    assert batch_token_cost(requests, padded=False) == 37
    assert batch_token_cost(requests) == 124
    futures = await submit_all(batcher, requests)
    await batcher.start()
    results = await outcomes(futures)
    await stop(batcher)

    assert all(o.ok for o in results)
    if padded:
        assert engine.batches == [["short-0", "short-1", "short-2"], ["long"]]
    else:
        assert engine.batches == [["short-0", "short-1", "short-2", "long"]]


def test_select_batch_is_the_policy_on_a_plain_list() -> None:
    queue = [
        req("a", prompt_len=50),
        req("b", prompt_len=3, priority=1),
        req("c", prompt_len=48),
        req("d", prompt_len=4),
        req("e", prompt_len=2, priority=1),
    ]
    # Head "b" (priority 1); then "e" (its class); then the closest of class 0 to 3: "d".
    assert select_batch(queue, max_batch_size=3, max_batch_tokens=10_000) == [1, 4, 3]
    assert select_batch([], max_batch_size=3, max_batch_tokens=10) == []
    # The head alone over the budget still goes, and alone.
    assert select_batch(queue, max_batch_size=3, max_batch_tokens=1) == [1]


QUEUED = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 16), st.integers(-2, 2)), min_size=1, max_size=25
)


@settings(max_examples=300, deadline=None)
@given(
    shapes=QUEUED,
    max_batch_size=st.integers(1, 8),
    max_batch_tokens=st.integers(1, 300),
    padded=st.booleans(),
)
def test_select_batch_properties(
    shapes: list[tuple[int, int, int]], max_batch_size: int, max_batch_tokens: int, padded: bool
) -> None:
    queue = [
        req(f"q{i}", prompt_len=p, max_new=n, priority=prio)
        for i, (p, n, prio) in enumerate(shapes)
    ]
    picked = select_batch(
        queue, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens, padded=padded
    )
    assert len(picked) == len(set(picked))
    assert_grouped_choice(
        [queue[i] for i in picked],
        [r for i, r in enumerate(queue) if i not in picked],
        {r.request_id: i for i, r in enumerate(queue)},
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        padded=padded,
    )
    # Draining the queue batch by batch runs everything exactly once, best head first.
    remaining = list(queue)
    heads: list[str] = []
    while remaining:
        taken = select_batch(
            remaining,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            padded=padded,
        )
        assert taken
        heads.append(remaining[taken[0]].request_id)
        remaining = [r for i, r in enumerate(remaining) if i not in taken]
    keys = {r.request_id: (-r.priority, i) for i, r in enumerate(queue)}
    assert [keys[h] for h in heads] == sorted(keys[h] for h in heads)


# -- when a batch starts -------------------------------------------------------------------


async def test_partial_batch_waits_for_max_wait_with_a_fixed_window() -> None:
    """``min_wait_s == max_wait_s``: the window of old, whatever the arrival rate."""
    engine = FakeEngine()
    max_wait = 0.2
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=max_wait, min_wait_s=max_wait)
    await batcher.start()
    t0 = time.monotonic()
    (future,) = await submit_all(batcher, [req("only")])
    await outcomes([future])
    elapsed = time.monotonic() - t0
    await stop(batcher)

    # Started no earlier than (about) max_wait after it was queued, and not much later.
    assert elapsed >= max_wait * 0.5
    assert elapsed < WAIT
    assert future.result().batch_wait_s >= max_wait * 0.5


async def test_wait_is_counted_from_the_oldest_request() -> None:
    """A request arriving during the wait joins the batch; the wait does not restart."""
    engine = FakeEngine()
    # A fixed window (the floor at the cap): adaptively, "first" would go at once.
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=1.0, min_wait_s=1.0)
    await batcher.start()
    first = await batcher.submit(req("first"))
    await asyncio.sleep(0.6)
    second = await batcher.submit(req("second"))
    await outcomes([first, second])
    await stop(batcher)

    assert engine.batches == [["first", "second"]]
    # The batch starts ~1.0 s after "first"; had "second" restarted the wait it would start
    # at >= 1.6 s. The bound sits halfway, so scheduling delays do not make it flaky.
    assert 0.5 <= first.result().batch_wait_s < 1.3
    assert second.result().batch_wait_s < first.result().batch_wait_s


async def test_lone_request_is_dispatched_at_once_when_idle() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=5.0)
    await batcher.start()
    (future,) = await submit_all(batcher, [req("only")])
    # max_wait is 5 s: only "nothing else is coming, go" finishes within the timeout.
    result = await asyncio.wait_for(future, 1.0)
    await stop(batcher)

    assert result.ok and result.batch_size == 1
    assert result.batch_wait_s < 1.0


async def test_trickle_is_served_without_waiting() -> None:
    """Requests further apart than the window each go at once: no company is expected."""
    clock = FakeClock()
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=30.0, clock=clock)
    await batcher.start()
    for i in range(5):
        future = await batcher.submit(req(f"r{i}"))
        # A wait of any part of the 30 s window would run past this (clock s = real s).
        result = await asyncio.wait_for(future, 2.0)
        assert result.ok and result.batch_size == 1 and result.batch_wait_s == 0.0
        clock.advance(60.0)
    await stop(batcher)
    assert engine.batches == [[f"r{i}"] for i in range(5)]


async def test_fast_stream_waits_for_full_batches() -> None:
    clock = FakeClock()
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=4, max_wait_s=30.0, clock=clock)
    await batcher.start()
    futures = []
    for i in range(12):
        futures.append(await batcher.submit(req(f"r{i}")))
        await settle()
        clock.advance(0.001)
    await asyncio.sleep(0.05)

    # The first request found no stream (and went alone at once); after it, 1 ms apart
    # against a 30 s window, every batch waits until it is full.
    assert engine.batches == [["r0"], ["r1", "r2", "r3", "r4"], ["r5", "r6", "r7", "r8"]]
    assert batcher.queued == 3
    await stop(batcher, 2.0)  # the stream ended: stop() sends the partial batch
    assert engine.batches[3:] == [["r9", "r10", "r11"]]
    results = await outcomes(futures)
    assert [o.batch_size for o in results] == [1] + [4] * 8 + [3] * 3
    assert results[1].batch_wait_s == pytest.approx(0.003)  # r1 waited for r2, r3, r4


async def test_a_stream_after_a_long_idle_spell_is_recognised_at_once() -> None:
    """Gaps count up to the window: an hour's pause does not take dozens of arrivals to
    forget (each of which would run alone)."""
    clock = FakeClock()
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=4, max_wait_s=30.0, clock=clock)
    await batcher.start()
    futures = [await batcher.submit(req("r0"))]
    await settle()
    clock.advance(3600.0)
    for i in range(1, 6):
        futures.append(await batcher.submit(req(f"r{i}")))
        await settle()
        clock.advance(0.001)
    await outcomes(futures)
    await stop(batcher)

    assert engine.batches == [["r0"], ["r1"], ["r2", "r3", "r4", "r5"]]


async def test_queue_over_the_padded_budget_starts_at_once() -> None:
    """Lag by the padded measure counts: a short and a long prompt overfill one batch."""
    clock = FakeClock()
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_tokens=40, max_wait_s=30.0, clock=clock)
    # One instant: a fast stream, so only "the queue is full" makes the batch go now.
    short, long = await submit_all(
        batcher, [req("short", prompt_len=1, max_new=1), req("long", prompt_len=30, max_new=1)]
    )
    await batcher.start()
    assert (await asyncio.wait_for(short, 2.0)).ok  # 2 * 31 >= 40, though 2 + 31 < 40
    await stop(batcher)  # "long" waits for company (it is a fast stream) until stop
    assert long.done() and long.result().ok
    assert engine.batches == [["short"], ["long"]]


async def test_fast_stream_fills_batches_on_the_real_clock() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=4, max_wait_s=2.0)
    await batcher.start()
    futures = []
    for i in range(13):
        futures.append(await batcher.submit(req(f"r{i}")))
        await asyncio.sleep(0.002)
    await stop(batcher)
    await outcomes(futures)

    # r0 went alone (no stream yet); a few ms apart against a 2 s window, the rest wait
    # for full batches (loose: a stalled machine may cut one batch short at the cap).
    assert engine.batches[0] == ["r0"]
    assert sorted(flat(engine.batches)) == sorted(f"r{i}" for i in range(13))
    assert [len(b) for b in engine.batches[1:]].count(4) >= 2
    assert len(engine.batches) <= 5


async def test_a_stream_that_stops_does_not_wait_out_the_cap() -> None:
    """A burst, then silence: once the silence outlasts the time left, the batch goes."""
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=1.0)
    await batcher.start()
    futures = await submit_all(batcher, [req(f"r{i}") for i in range(5)])  # one instant
    results = await outcomes(futures)
    await stop(batcher)

    assert engine.batches == [[f"r{i}" for i in range(5)]]
    # Fewer than one more arrival is expected from halfway through the window on (the
    # silence since the burst is then longer than what is left); a fixed window says 1 s.
    assert 0.25 <= results[0].batch_wait_s < 0.9


async def test_full_batch_starts_without_waiting() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=2, max_wait_s=30.0)
    await batcher.start()
    futures = await submit_all(batcher, [req("a"), req("b")])
    # max_wait is 30 s: only "full means go" can finish these within the timeout.
    results = await asyncio.wait_for(asyncio.gather(*futures), 2.0)
    await stop(batcher)

    assert engine.batches == [["a", "b"]]
    assert all(o.ok for o in results)


async def test_token_full_batch_starts_without_waiting() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=16, max_batch_tokens=10, max_wait_s=30.0)
    await batcher.start()
    future = await batcher.submit(req("big", prompt_len=6, max_new=4))
    result = await asyncio.wait_for(future, 2.0)
    await stop(batcher)

    assert result.ok


async def test_requests_queued_during_a_batch_form_the_next_batch() -> None:
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    await batcher.start()
    first = await batcher.submit(req("first"))
    await asyncio.wait_for(engine.started.wait(), WAIT)
    later = await submit_all(batcher, [req(f"later-{i}") for i in range(3)])
    gate.set()
    await outcomes([first, *later])
    await stop(batcher)

    assert engine.batches == [["first"], ["later-0", "later-1", "later-2"]]


# -- priority ------------------------------------------------------------------------------


async def test_higher_priority_goes_first() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=2, max_wait_s=0.01)
    priorities = {"p0": 0, "p5": 5, "p1": 1, "p9": 9, "p3": 3}
    futures = await submit_all(batcher, [req(k, priority=v) for k, v in priorities.items()])
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    assert engine.batches == [["p9", "p5"], ["p3", "p1"], ["p0"]]


async def test_equal_priority_is_first_come_first_served() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=2, max_wait_s=0.01)
    requests = [req("a", priority=1), req("b"), req("c", priority=1), req("d"), req("e")]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    await outcomes(futures)
    await stop(batcher)

    assert engine.batches == [["a", "c"], ["b", "d"], ["e"]]


async def test_priority_applies_to_requests_queued_while_the_engine_is_busy() -> None:
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, max_batch_size=1, max_wait_s=0.0)
    await batcher.start()
    blocker = await batcher.submit(req("blocker"))
    await asyncio.wait_for(engine.started.wait(), WAIT)
    queued = await submit_all(
        batcher, [req("low", priority=-1), req("mid", priority=0), req("high", priority=10)]
    )
    gate.set()
    await outcomes([blocker, *queued])
    await stop(batcher)

    assert engine.batches == [["blocker"], ["high"], ["mid"], ["low"]]


# -- expiry --------------------------------------------------------------------------------


async def test_expired_requests_never_reach_the_engine() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    now = time.monotonic()
    requests = [
        req("live", deadline=now + 60.0),
        req("dead", deadline=now - 1.0),
        req("no-deadline"),
    ]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    live, dead, free = await outcomes(futures)
    await stop(batcher)

    assert dead.expired
    assert dead.completion is None and dead.error is None and not dead.ok
    assert not live.expired and live.ok and live.completion.text == "out:live"  # type: ignore[union-attr]
    assert free.ok
    assert "dead" not in flat(engine.batches)
    assert engine.batches == [["live", "no-deadline"]]


async def test_request_that_expires_while_queued_is_not_run() -> None:
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, max_batch_size=1, max_wait_s=0.0)
    await batcher.start()
    blocker = await batcher.submit(req("blocker"))
    await asyncio.wait_for(engine.started.wait(), WAIT)
    short = await batcher.submit(req("short", deadline=time.monotonic() + 0.05))
    await asyncio.sleep(0.15)  # its deadline passes while the engine is busy
    gate.set()
    _, outcome = await outcomes([blocker, short])
    await stop(batcher)

    assert outcome.expired
    assert engine.batches == [["blocker"]]


# -- outcomes ------------------------------------------------------------------------------


async def test_each_request_gets_its_own_outcome_once() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=4, max_wait_s=0.01)
    await batcher.start()
    requests = [req(f"r{i}", prompt_len=i + 1) for i in range(10)]
    futures = await submit_all(batcher, requests)
    results = await outcomes(futures)
    await stop(batcher)

    assert [o.completion.text for o in results] == [f"out:{r.request_id}" for r in requests]  # type: ignore[union-attr]
    assert [o.completion.prompt_tokens for o in results] == [i + 1 for i in range(10)]  # type: ignore[union-attr]
    assert sorted(flat(engine.batches)) == sorted(r.request_id for r in requests)
    assert all(o.inference_s >= 0 and o.batch_wait_s >= 0 for o in results)


async def test_poison_request_fails_alone_and_the_loop_keeps_serving() -> None:
    engine = FakeEngine(fail_if=lambda r: r.request_id == "poison")
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    requests = [req("a"), req("poison"), req("b"), req("c")]
    futures = await submit_all(batcher, requests)
    await batcher.start()
    a, poison, b, c = await outcomes(futures)

    assert isinstance(poison.error, ValueError)
    assert poison.completion is None
    assert [o.completion.text for o in (a, b, c)] == ["out:a", "out:b", "out:c"]  # type: ignore[union-attr]
    assert all(o.error is None for o in (a, b, c))
    # The whole batch was tried once, then each request alone.
    assert engine.batches[0] == ["a", "poison", "b", "c"]
    assert sorted(engine.batches[1:]) == [["a"], ["b"], ["c"], ["poison"]]

    (later,) = await outcomes(await submit_all(batcher, [req("later")]))
    await stop(batcher)
    assert later.ok and later.completion.text == "out:later"  # type: ignore[union-attr]


async def test_wrong_number_of_outcomes_fails_each_request_and_loop_survives() -> None:
    broken = True

    async def engine(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
        if broken:
            return [completion_for(r) for r in batch] + [completion_for(batch[0])]
        return [completion_for(r) for r in batch]

    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    futures = await submit_all(batcher, [req("a"), req("b"), req("c")])
    await batcher.start()
    results = await outcomes(futures)
    assert all(isinstance(o.error, EngineError) for o in results)
    assert all(o.completion is None for o in results)

    broken = False
    (later,) = await outcomes(await submit_all(batcher, [req("later")]))
    await stop(batcher)
    assert later.ok


async def test_too_few_outcomes_is_also_an_error() -> None:
    async def engine(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
        return []

    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    futures = await submit_all(batcher, [req("a"), req("b")])
    await batcher.start()
    results = await outcomes(futures)
    await stop(batcher)
    assert all(isinstance(o.error, EngineError) for o in results)


async def test_exception_instance_fails_only_its_request() -> None:
    calls: list[list[str]] = []

    async def engine(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
        calls.append([r.request_id for r in batch])
        return [
            RuntimeError(f"bad {r.request_id}") if r.request_id == "bad" else completion_for(r)
            for r in batch
        ]

    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    futures = await submit_all(batcher, [req("a"), req("bad"), req("c")])
    await batcher.start()
    a, bad, c = await outcomes(futures)
    await stop(batcher)

    assert isinstance(bad.error, RuntimeError) and str(bad.error) == "bad bad"
    assert bad.completion is None
    assert a.completion.text == "out:a" and c.completion.text == "out:c"  # type: ignore[union-attr]
    assert calls == [["a", "bad", "c"]]  # no retry: the engine answered per request
    assert bad.batch_size == 3


async def test_non_completion_outcome_becomes_an_engine_error() -> None:
    async def engine(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
        return ["not a completion" if r.request_id == "odd" else completion_for(r) for r in batch]  # type: ignore[misc]

    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    futures = await submit_all(batcher, [req("a"), req("odd")])
    await batcher.start()
    a, odd = await outcomes(futures)
    await stop(batcher)

    assert a.ok
    assert isinstance(odd.error, EngineError) and odd.completion is None


async def test_engine_that_raises_cancelled_error_does_not_kill_the_loop() -> None:
    """A CancelledError escaping the engine (not a cancel of the loop) is a batch failure."""
    fail = True

    async def engine(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
        if fail:
            raise asyncio.CancelledError()
        return [completion_for(r) for r in batch]

    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01)
    futures = await submit_all(batcher, [req("a"), req("b")])
    await batcher.start()
    results = await outcomes(futures)
    assert all(o.error is not None and o.completion is None for o in results)

    fail = False
    (later,) = await outcomes(await submit_all(batcher, [req("later")]))
    await stop(batcher)
    assert later.ok


async def test_owner_cancelled_request_is_skipped_and_frees_its_slot() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.01, max_queue=2)
    keep, drop = await submit_all(batcher, [req("keep"), req("drop")])
    drop.cancel()
    # The cancelled request's slot is free again: a third submit does not block.
    third = await asyncio.wait_for(batcher.submit(req("third")), 1.0)
    await batcher.start()
    await outcomes([keep, third])
    await stop(batcher)

    assert "drop" not in flat(engine.batches)
    assert sorted(flat(engine.batches)) == ["keep", "third"]


# -- backpressure and lifecycle ------------------------------------------------------------


async def test_submit_waits_while_the_queue_is_full() -> None:
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, max_batch_size=1, max_wait_s=0.0, max_queue=2)
    await batcher.start()
    first, second = await submit_all(batcher, [req("first"), req("second")])
    await asyncio.wait_for(engine.started.wait(), WAIT)

    third_submit = asyncio.ensure_future(batcher.submit(req("third")))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(third_submit), 0.1)
    assert not third_submit.done()
    assert not first.done() and not second.done()

    gate.set()  # the engine finishes "first": its slot frees up
    third = await asyncio.wait_for(third_submit, WAIT)
    results = await outcomes([first, second, third])
    await stop(batcher)
    assert [o.completion.text for o in results] == ["out:first", "out:second", "out:third"]  # type: ignore[union-attr]


async def test_stop_drains_queued_requests() -> None:
    engine = FakeEngine()
    # A 30 s wait and a batch that never fills: only stop() can make these run soon.
    batcher = MicroBatcher(engine, max_batch_size=16, max_wait_s=30.0)
    await batcher.start()
    futures = await submit_all(batcher, [req(f"r{i}") for i in range(5)])
    await asyncio.sleep(0.01)
    assert not any(f.done() for f in futures)
    await stop(batcher, 2.0)

    assert all(f.done() for f in futures)
    assert all(f.result().ok for f in futures)
    assert sorted(flat(engine.batches)) == [f"r{i}" for i in range(5)]
    assert batcher.queued == 0


async def test_stop_drains_more_than_one_batch() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=2, max_wait_s=30.0)
    futures = await submit_all(batcher, [req(f"r{i}") for i in range(5)])
    await batcher.start()
    await stop(batcher, 2.0)
    assert all(f.done() and f.result().ok for f in futures)
    assert [len(b) for b in engine.batches] == [2, 2, 1]


async def test_submit_after_stop_raises() -> None:
    batcher = MicroBatcher(FakeEngine(), max_wait_s=0.0)
    await batcher.start()
    await stop(batcher)
    with pytest.raises(BatcherClosedError):
        await batcher.submit(req("late"))


async def test_submit_blocked_on_backpressure_raises_when_stopped() -> None:
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    batcher = MicroBatcher(engine, max_batch_size=1, max_wait_s=0.0, max_queue=1)
    await batcher.start()
    first = await batcher.submit(req("first"))
    await asyncio.wait_for(engine.started.wait(), WAIT)
    blocked = asyncio.ensure_future(batcher.submit(req("blocked")))
    await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(batcher.stop())
    await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(BatcherClosedError):
        await asyncio.wait_for(blocked, WAIT)
    await asyncio.wait_for(stopping, WAIT)
    assert first.result().ok
    assert engine.batches == [["first"]]


# -- invariants over random request sets ----------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


REQUEST = st.tuples(
    st.integers(0, 24),  # prompt length
    st.integers(1, 24),  # max_new_tokens
    st.integers(-3, 3),  # priority
    st.booleans(),  # already expired
    st.booleans(),  # poison: any batch holding it raises
    st.booleans(),  # submitted before start (queued) or after (arrives while running)
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.lists(REQUEST, min_size=1, max_size=30),
    max_batch_size=st.integers(1, 6),
    max_batch_tokens=st.integers(1, 150),
    padded=st.booleans(),
    waits=st.sampled_from([(0.0, 0.0), (0.0, 0.002), (0.002, 0.002)]),  # (min, max)
)
async def test_batching_invariants(
    specs: list[tuple[int, int, int, bool, bool, bool]],
    max_batch_size: int,
    max_batch_tokens: int,
    padded: bool,
    waits: tuple[float, float],
) -> None:
    # Each batch's first engine call, with what was still queued at that moment.
    first_calls: list[tuple[list[str], list[str]]] = []
    retries_due: set[str] = set()

    def watch(ids: list[str]) -> None:
        if len(ids) == 1 and ids[0] in retries_due:
            retries_due.discard(ids[0])  # a failed batch's request, retried alone
            return
        if len(ids) > 1 and any(rid.startswith("poison") for rid in ids):
            retries_due.update(ids)
        left = [e.request.request_id for e in batcher._heap if not e.future.done()]
        first_calls.append((ids, left))

    engine = FakeEngine(fail_if=lambda r: r.request_id.startswith("poison"), watch=watch)
    batcher = MicroBatcher(
        engine,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        min_wait_s=waits[0],
        max_wait_s=waits[1],
        padded_budget=padded,
        max_queue=len(specs) + 1,
    )
    errors = _Collect()
    logging.getLogger("inference.batcher").addHandler(errors)
    now = time.monotonic()
    requests = [
        req(
            f"{'poison' if poison else 'ok'}-{i}",
            prompt_len=prompt_len,
            max_new=max_new,
            priority=priority,
            deadline=now - 1.0 if expired else now + 600.0,
        )
        for i, (prompt_len, max_new, priority, expired, poison, _) in enumerate(specs)
    ]
    by_id = {r.request_id: r for r in requests}
    early = [r for r, spec in zip(requests, specs, strict=True) if spec[5]]
    late = [r for r, spec in zip(requests, specs, strict=True) if not spec[5]]
    rank = {r.request_id: k for k, r in enumerate([*early, *late])}  # arrival order
    futures = {r.request_id: await batcher.submit(r) for r in early}
    await batcher.start()
    for r in late:
        futures[r.request_id] = await batcher.submit(r)
        await asyncio.sleep(0)
    try:
        results = dict(zip(futures, await outcomes(list(futures.values())), strict=True))
        await stop(batcher)
    finally:
        logging.getLogger("inference.batcher").removeHandler(errors)

    # Every batch the engine saw is within limits (a lone over-budget request excepted).
    for batch in engine.batches:
        assert 1 <= len(batch) <= max_batch_size
        cost = batch_token_cost((by_id[rid] for rid in batch), padded=padded)
        assert cost <= max_batch_tokens or len(batch) == 1
    # Each batch was formed by the grouping policy from what was queued: it holds the
    # head of the queue (so nothing starves), and nothing left behind would have fitted
    # ahead of a request the policy took after it (priority class, then prompt length).
    assert not retries_due
    for ids, left in first_calls:
        assert_grouped_choice(
            [by_id[rid] for rid in ids],
            [by_id[rid] for rid in left],
            rank,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            padded=padded,
        )
    # No request is answered by two batches, and every live healthy request by one.
    answered = flat(engine.succeeded)
    assert len(answered) == len(set(answered))
    for i, (_, _, _, expired, poison, _) in enumerate(specs):
        rid = requests[i].request_id
        outcome = results[rid]
        assert isinstance(outcome, BatchOutcome)
        if expired:
            assert outcome.expired and outcome.completion is None
            assert rid not in flat(engine.batches)
        elif poison:
            assert isinstance(outcome.error, ValueError) and outcome.completion is None
            assert rid not in answered
        else:
            assert outcome.ok and outcome.completion.text == f"out:{rid}"  # type: ignore[union-attr]
            assert answered.count(rid) == 1
    # A failed batch is retried one request at a time, so a poisoned request only ever
    # runs alone after its first batch.
    for rid in (r.request_id for r in requests if r.request_id.startswith("poison")):
        seen = [b for b in engine.batches if rid in b]
        assert all(b == [rid] for b in seen[1:])
    # Nothing went wrong outside the engine (e.g. a future resolved twice).
    assert not errors.records
    assert batcher.queued == 0


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 5.0), min_size=1, max_size=20),
    window=st.floats(0.0, 10.0),
    at=st.floats(0.0, 1.0),
    alpha=st.floats(0.05, 1.0),
)
def test_arrival_rate_quiet_from_matches_expected(
    gaps: list[float], window: float, at: float, alpha: float
) -> None:
    """``quiet_from`` is where ``expected`` arrivals before the cap drop below one."""
    rate = ArrivalRate(alpha=alpha)
    t = 0.0
    rate.observe(t)
    for gap in gaps:
        t += gap
        rate.observe(t)
    until = t + window
    quiet = rate.quiet_from(until)
    now = t + at * window  # any moment between the last arrival and the cap
    slack = 1e-9 * (1.0 + abs(until))
    if now > quiet + slack:
        assert rate.expected(now, until) < 1.0
    elif now < quiet - slack:
        assert rate.expected(now, until) >= 1.0
    assert quiet <= until


def test_arrival_rate_numbers() -> None:
    rate = ArrivalRate(alpha=0.5)
    assert rate.rate(0.0) == 0.0 and rate.quiet_from(1.0) == -math.inf
    rate.observe(10.0)  # one arrival: no gap yet, still unknown
    assert rate.rate(10.0) == 0.0 and rate.expected(10.0, 11.0) == 0.0
    rate.observe(10.1)
    assert rate.mean_gap_s == pytest.approx(0.1)
    rate.observe(10.4)  # gap 0.3, weight 0.5
    assert rate.mean_gap_s == pytest.approx(0.2)
    assert rate.rate(10.4) == pytest.approx(5.0)
    assert rate.rate(11.4) == pytest.approx(1.0)  # a second of silence: at most 1/s now
    assert rate.expected(10.4, 11.4) == pytest.approx(5.0)
    # Near cap: fewer than one more before 10.6 from 10.4 (one mean gap short of it) on.
    assert rate.quiet_from(10.6) == pytest.approx(10.4)
    # Far cap: the silence rule comes first, halfway from the last arrival to the cap.
    assert rate.quiet_from(20.4) == pytest.approx(15.4)
    rate.observe(10.4)  # same instant: a zero gap
    assert rate.mean_gap_s == pytest.approx(0.1)
    burst = ArrivalRate()
    burst.observe(1.0)
    burst.observe(1.0)
    assert burst.rate(1.0) == math.inf
    capped = ArrivalRate(alpha=1.0, horizon_s=0.5)
    capped.observe(0.0)
    capped.observe(100.0)  # a long pause counts as the horizon
    assert capped.mean_gap_s == 0.5
    with pytest.raises(ValueError):
        ArrivalRate(alpha=0.0)


# -- robustness ----------------------------------------------------------------------------


async def test_a_failing_clock_does_not_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    class FlakyClock(FakeClock):
        failures = 0

        def __call__(self) -> float:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("clock broke")
            return self.now

    clock = FlakyClock()
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.05, clock=clock)
    futures = await submit_all(batcher, [req("a"), req("b")])
    clock.failures = 2  # the wait and then the batch selection fail
    await batcher.start()
    with caplog.at_level(logging.ERROR, logger="inference.batcher"):
        results = await outcomes(futures)
    (later,) = await outcomes(await submit_all(batcher, [req("later")]))
    await stop(batcher)

    assert all(o.ok for o in results) and later.ok
    assert engine.batches[0] == ["a"]  # the fallback: the head of the queue alone
    assert sorted(flat(engine.batches)) == ["a", "b", "later"]
    assert len([r for r in caplog.records if r.name == "inference.batcher"]) == 2


async def test_malformed_request_fails_its_submit_and_keeps_no_slot() -> None:
    engine = FakeEngine()
    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.0, max_queue=1)
    await batcher.start()
    bad = req("bad")
    bad.priority = None  # type: ignore[assignment]
    with pytest.raises(TypeError):
        await batcher.submit(bad)
    (good,) = await outcomes([await asyncio.wait_for(batcher.submit(req("good")), 1.0)])
    await stop(batcher)
    assert good.ok and engine.batches == [["good"]]


async def test_cancelling_the_loop_itself_still_stops_it() -> None:
    """Treating an engine's own CancelledError as a failure must not swallow a real cancel."""
    started = asyncio.Event()

    async def engine(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
        started.set()
        await asyncio.Event().wait()  # never finishes on its own
        raise AssertionError("unreachable")

    batcher = MicroBatcher(engine, max_batch_size=8, max_wait_s=0.0)
    await batcher.start()
    await batcher.submit(req("stuck"))
    await asyncio.wait_for(started.wait(), WAIT)
    task = batcher._task
    assert task is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)
    assert task.cancelled()
