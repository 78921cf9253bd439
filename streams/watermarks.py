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

Offsets that were never delivered are not passed either. When a partition's first record
comes after the offset committed for it (:meth:`start`), or a record comes after a jump
past the next offset, the skipped range is a *hole*: the watermark stays at its start until
:meth:`close_hole` says every record in it was read some other way (the pipeline reads
holes directly from the broker; a hole can also be only transaction markers).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Hashable, Iterable
from typing import NamedTuple

logger = logging.getLogger(__name__)


class Tracked(NamedTuple):
    """What :meth:`OffsetWatermarks.track` learned from one delivery."""

    redelivery: bool  # at or below the highest offset read
    hole: tuple[int, int] | None  # [start, end) skipped right before this offset


class _PartitionMarks:
    __slots__ = ("committed", "expected", "heap", "holes", "next_offset", "open")

    def __init__(self, expected: int | None = None) -> None:
        self.open: dict[int, int] = {}  # offset -> deliveries not yet finished
        self.heap: list[int] = []  # open offsets (and lazily, some finished ones)
        self.holes: set[tuple[int, int]] = set()  # [start, end) not delivered, not yet read
        self.expected = expected  # the first offset to come (the committed one), if known
        self.next_offset: int | None = None  # highest seen + 1
        self.committed: int | None = None  # last watermark handed out by committable()

    def watermark(self) -> int | None:
        heap = self.heap
        while heap and heap[0] not in self.open:
            heapq.heappop(heap)
        marks = [heap[0]] if heap else []
        if self.holes:
            marks.append(min(start for start, _ in self.holes))
        if marks:
            return min(marks)
        return self.next_offset


class OffsetWatermarks:
    """Tracks read and finished offsets; says what is safe to commit."""

    def __init__(self) -> None:
        self._parts: dict[Hashable, _PartitionMarks] = {}
        self.redeliveries = 0  # offsets read again at or below the highest one seen

    def knows(self, tp: Hashable) -> bool:
        """Whether ``tp`` has state (was started or tracked since it was last forgotten)."""
        return tp in self._parts

    def start(self, tp: Hashable, committed: int | None) -> None:
        """A partition was assigned: its first record should be ``committed`` (the group's
        committed offset; None when there is none or it is unknown)."""
        marks = self._parts[tp] = _PartitionMarks(committed)
        marks.committed = committed  # and never commit below what the group has

    def track(self, tp: Hashable, offset: int) -> Tracked:
        """Record that ``offset`` of ``tp`` was read and is now in flight."""
        marks = self._parts.get(tp)
        if marks is None:
            marks = self._parts[tp] = _PartitionMarks()
        count = marks.open.get(offset, 0)
        if count == 0:
            heapq.heappush(marks.heap, offset)
        marks.open[offset] = count + 1
        if marks.next_offset is None or offset >= marks.next_offset:
            expected = marks.next_offset if marks.next_offset is not None else marks.expected
            hole = None
            if expected is not None and offset > expected:
                hole = (expected, offset)
                marks.holes.add(hole)
            marks.next_offset = offset + 1
            return Tracked(False, hole)
        self.redeliveries += 1
        logger.debug(
            "%s: offset %d read again (highest read %d)", tp, offset, marks.next_offset - 1
        )
        return Tracked(True, None)

    def close_hole(self, tp: Hashable, hole: tuple[int, int]) -> None:
        """Every record of ``hole`` was tracked (or it had none): stop holding the mark."""
        marks = self._parts.get(tp)
        if marks is not None:
            marks.holes.discard(hole)

    def shrink_hole(self, tp: Hashable, hole: tuple[int, int], new_start: int) -> tuple[int, int]:
        """Every record of ``hole`` below ``new_start`` was tracked: the hole now starts
        there. Returns the hole as it is now (closed when ``new_start`` reaches its end)."""
        marks = self._parts.get(tp)
        start, end = hole
        if marks is None or hole not in marks.holes or new_start <= start:
            return hole
        marks.holes.discard(hole)
        if new_start < end:
            marks.holes.add((new_start, end))
            return (new_start, end)
        return (end, end)

    def holes(self, tp: Hashable) -> list[tuple[int, int]]:
        marks = self._parts.get(tp)
        return sorted(marks.holes) if marks is not None else []

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
