"""Per-partition commit watermarks for out-of-order completion.

Requests of one partition finish out of order (a dead letter is faster than a generation;
batches differ in length). A partition's committed offset may only move up to its lowest
unfinished offset: commit ``w`` means "everything below ``w`` is answered".

Every delivery of an offset is counted, and each needs its own :meth:`finish`: a record
delivered twice (a seek back after a rebalance, or any re-delivery at all) is unfinished
until both copies are answered. Nothing that was read and not answered is ever dropped from
the accounting by a later delivery; only :meth:`forget` (the partition was revoked) drops
it. The watermark never moves backwards. Offsets normally arrive in increasing order per
partition, which keeps every operation O(log n) at worst.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Hashable, Iterable

logger = logging.getLogger(__name__)


class _PartitionMarks:
    __slots__ = ("committed", "heap", "next_offset", "open")

    def __init__(self) -> None:
        self.open: dict[int, int] = {}  # offset -> deliveries not yet finished
        self.heap: list[int] = []  # open offsets (and lazily, some finished ones)
        self.next_offset: int | None = None  # highest seen + 1
        self.committed: int | None = None  # last watermark handed out by committable()

    def watermark(self) -> int | None:
        heap = self.heap
        while heap and heap[0] not in self.open:
            heapq.heappop(heap)
        if heap:
            return heap[0]
        return self.next_offset


class OffsetWatermarks:
    """Tracks read and finished offsets; says what is safe to commit."""

    def __init__(self) -> None:
        self._parts: dict[Hashable, _PartitionMarks] = {}
        self.redeliveries = 0  # offsets read again at or below the highest one seen

    def track(self, tp: Hashable, offset: int) -> bool:
        """Record that ``offset`` of ``tp`` was read and is now in flight. Returns whether it
        is a re-delivery (at or below the highest offset read)."""
        marks = self._parts.get(tp)
        if marks is None:
            marks = self._parts[tp] = _PartitionMarks()
        count = marks.open.get(offset, 0)
        if count == 0:
            heapq.heappush(marks.heap, offset)
        marks.open[offset] = count + 1
        if marks.next_offset is None or offset >= marks.next_offset:
            marks.next_offset = offset + 1
            return False
        self.redeliveries += 1
        logger.debug(
            "%s: offset %d read again (highest read %d)", tp, offset, marks.next_offset - 1
        )
        return True

    def finish(self, tp: Hashable, offset: int) -> None:
        """Record that one delivery of ``offset`` is answered (its result or dead letter is
        on the broker). A finish for a delivery not in flight changes nothing."""
        marks = self._parts.get(tp)
        if marks is None:
            return
        count = marks.open.get(offset)
        if not count:
            return
        if count == 1:
            del marks.open[offset]
        else:
            marks.open[offset] = count - 1

    def in_flight(self, tp: Hashable | None = None) -> int:
        """Deliveries read and not yet answered."""
        parts = self._parts.values() if tp is None else [self._parts.get(tp)]
        return sum(sum(m.open.values()) for m in parts if m is not None)

    def committable(self) -> dict[Hashable, int]:
        """Watermarks that moved forward since the last commit (offsets to commit)."""
        moved: dict[Hashable, int] = {}
        for tp, marks in self._parts.items():
            mark = marks.watermark()
            if mark is not None and (marks.committed is None or mark > marks.committed):
                moved[tp] = mark
        return moved

    def mark_committed(self, offsets: dict[Hashable, int]) -> None:
        for tp, offset in offsets.items():
            marks = self._parts.get(tp)
            if marks is not None:
                marks.committed = offset

    def forget(self, tps: Iterable[Hashable]) -> None:
        """Drop partitions this worker no longer owns (revoked in a rebalance)."""
        for tp in tps:
            self._parts.pop(tp, None)
