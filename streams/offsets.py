"""The offset keeper: which offsets of the requests topic this worker read, answered and may
commit, per partition it owns.

It wraps :class:`streams.watermarks.OffsetWatermarks` with what the stream around it adds:

* **Ownership.** Every partition has an *epoch* that moves on each revocation. A caller
  that awaits anything between reading a record and tracking it takes a :class:`Claim`
  first and tracks only if :meth:`OffsetKeeper.still_owned` says the claim holds: a record
  of a partition revoked in between is dropped untracked (the new owner reads it from the
  committed offset), so no state is ever rebuilt for a partition this worker gave away.
* **Commits** only for partitions the consumer has assigned right now, and only the
  offsets actually handed to the committer are recorded as committed.
* **Holes** (offsets the stream skipped, see :mod:`streams.holes`) are read from the broker
  in chunks by a repair task; each chunk is handed back to the pipeline and the hole shrinks
  as it goes, so a hole of any size makes progress, and the mark never passes an offset that
  was not read.
* **Lag**: end offset minus the next offset to read, per partition.

The I/O (committing, reading the committed offset, reading holes) is passed in; the logic
is tested with plain fakes (tests/unit/test_offsets.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from streams.log_limits import RateLimitedLogger
from streams.records import SourceRecord
from streams.watermarks import OffsetWatermarks, Tracked

logger = logging.getLogger(__name__)

Committer = Callable[[dict[Hashable, int]], Awaitable[bool]]
Highwater = Callable[[Hashable], int | None]
Assigned = Callable[[], Iterable[Hashable]]
Answer = Callable[[SourceRecord], Awaitable[None]]


class HoleSource(Protocol):
    """Reads the group's committed offset and skipped records from the broker."""

    async def committed(self, tp: Hashable) -> int | None: ...

    def read_chunks(self, tp: Hashable, start: int, end: int) -> Any: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Claim:
    tp: Hashable
    epoch: int


class OffsetKeeper:
    """Watermarks + ownership + commits + hole repair for the partitions of one consumer."""

    def __init__(
        self,
        *,
        holes: HoleSource | None = None,
        metrics: Any = None,
        committed_timeout_s: float = 30.0,
    ) -> None:
        self.watermarks = OffsetWatermarks()
        self._holes = holes
        self._metrics = metrics
        self._committed_timeout_s = committed_timeout_s
        self._epochs: dict[Hashable, int] = {}
        self._committer: Committer | None = None
        self._assigned: Assigned | None = None
        self._highwater: Highwater | None = None
        self._answer: Answer | None = None
        self._positions: dict[Hashable, int] = {}
        self._repairs: dict[Hashable, set[asyncio.Task[None]]] = {}
        self._log = RateLimitedLogger(logger, interval_s=10.0)

    def bind(
        self,
        committer: Committer,
        *,
        assigned: Assigned | None = None,
        highwater: Highwater | None = None,
        answer: Answer | None = None,
    ) -> None:
        """Connect the consumer side (called once the consumer exists)."""
        self._committer = committer
        self._assigned = assigned
        self._highwater = highwater
        self._answer = answer

    # -- ownership -----------------------------------------------------------------------
    def claim(self, tp: Hashable) -> Claim:
        return Claim(tp, self._epochs.get(tp, 0))

    def owns(self, tp: Hashable) -> bool:
        if self._assigned is None:
            return True
        try:
            return tp in set(self._assigned())
        except Exception:  # the consumer is going away: own nothing
            return False

    def still_owned(self, claim: Claim) -> bool:
        """No revocation of ``claim.tp`` since the claim, and the consumer has it now."""
        return self._epochs.get(claim.tp, 0) == claim.epoch and self.owns(claim.tp)

    # -- partitions ------------------------------------------------------------------------
    def knows(self, tp: Hashable) -> bool:
        return self.watermarks.knows(tp)

    async def start_partition(self, claim: Claim) -> None:
        """First record of a newly assigned partition: learn where it should start."""
        committed: int | None = None
        if self._holes is not None:
            try:
                committed = await asyncio.wait_for(
                    self._holes.committed(claim.tp), self._committed_timeout_s
                )
            except Exception as exc:  # no hole check for this first record, still correct
                logger.warning("committed offset of %s unknown (%r)", claim.tp, exc)
        if self.still_owned(claim) and not self.watermarks.knows(claim.tp):
            self.watermarks.start(claim.tp, committed)

    def track(self, source: SourceRecord) -> Tracked:
        """``source`` was read and is now in flight (call only with a claim that holds)."""
        tracked = self.watermarks.track(source.tp, source.offset)
        if tracked.redelivery and self._metrics is not None:
            self._metrics.redeliveries_total.inc()
        if tracked.hole is not None:
            self._repair(source.tp, tracked.hole)
        self._positions[source.tp] = max(self._positions.get(source.tp, 0), source.offset + 1)
        return tracked

    def finish(self, source: SourceRecord) -> None:
        self.watermarks.finish(source.tp, source.offset)

    # -- holes -------------------------------------------------------------------------------
    def _repair(self, tp: Hashable, hole: tuple[int, int]) -> None:
        if self._holes is None or self._answer is None:
            self.watermarks.close_hole(tp, hole)  # not checked: trust the stream
            return
        task = asyncio.create_task(self._read_hole(self.claim(tp), hole), name=f"hole-{tp}")
        tasks = self._repairs.setdefault(tp, set())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _read_hole(self, claim: Claim, hole: tuple[int, int]) -> None:
        """Read the records the stream skipped, answer them; shrink the hole as they are
        tracked, and close it when the broker's position reached its end."""
        assert self._holes is not None and self._answer is not None
        tp, (start, end) = claim.tp, hole
        current = hole
        answered = 0
        async for chunk in self._holes.read_chunks(tp, start, end):
            if not self.still_owned(claim):
                return  # revoked meanwhile: the new owner reads from the committed offset
            for record in chunk:
                await self._answer(record)
                if not self.still_owned(claim):
                    return
                current = self.watermarks.shrink_hole(tp, current, record.offset + 1)
            answered += len(chunk)
        if not self.still_owned(claim):
            return
        self.watermarks.close_hole(tp, current)
        if answered:
            if self._metrics is not None:
                self._metrics.skipped_records_total.inc(answered)
            logger.warning(
                "the stream skipped %d records of %s in [%d, %d); answered them",
                answered,
                tp,
                start,
                end,
            )

    # -- commits -------------------------------------------------------------------------------
    async def commit_now(self) -> dict[Hashable, int]:
        """Commit every owned partition's watermark that moved. Returns what was committed."""
        offsets = {tp: o for tp, o in self.watermarks.committable().items() if self.owns(tp)}
        if not offsets or self._committer is None:
            return {}
        if await self._committer(offsets):
            self.watermarks.mark_committed(offsets)
            if self._metrics is not None:
                self._metrics.commits_total.inc()
            return offsets
        return {}

    async def run_commits(self, interval_s: float, timeout_s: float = 30.0) -> None:
        """Commit every ``interval_s`` until cancelled; failures are retried next round."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.wait_for(self.commit_now(), timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning("commit", "offset commit failed (%r); will retry", exc)
            self.update_lag()

    def update_lag(self) -> None:
        if self._highwater is None or self._metrics is None:
            return
        for tp, position in list(self._positions.items()):
            end = self._highwater(tp)
            if end is not None:
                partition = getattr(tp, "partition", tp)
                self._metrics.consumer_lag.labels(partition=str(partition)).set(end - position)

    async def revoke(self, tps: Iterable[Hashable]) -> None:
        """Before a rebalance takes ``tps`` away: commit what is done, then forget them."""
        tps = set(tps)
        for tp in tps:
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
            for task in self._repairs.pop(tp, set()):
                task.cancel()
        try:
            await self.commit_now()
        finally:
            self.watermarks.forget(tps)
            for tp in tps:
                self._positions.pop(tp, None)

    async def close(self) -> None:
        tasks = [t for ts in self._repairs.values() for t in ts]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._repairs.clear()
        if self._holes is not None:
            try:
                await self._holes.close()
            except Exception as exc:
                logger.warning("closing the hole reader failed: %r", exc)
