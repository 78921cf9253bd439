"""Per-partition commit watermarks for out-of-order completion.

Requests of one partition finish out of order (a dead letter is faster than a generation;
batches differ in length). A partition's committed offset may only move up to its lowest
unfinished offset: commit ``w`` means "everything below ``w`` is answered". Offsets arrive
in increasing order per partition (Kafka's order), which keeps every operation O(1)
amortized.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable


class _PartitionMarks:
    __slots__ = ("committed", "done", "next_offset", "pending")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # offsets seen, in order, not yet below the mark
        self.done: set[int] = set()
        self.next_offset: int | None = None  # highest seen + 1
        self.committed: int | None = None  # last watermark handed out by committable()

    def watermark(self) -> int | None:
        while self.pending and self.pending[0] in self.done:
            self.done.discard(self.pending.popleft())
        if self.pending:
            return self.pending[0]
        return self.next_offset


class OffsetWatermarks:
    """Tracks seen and finished offsets; says what is safe to commit."""

    def __init__(self) -> None:
        self._parts: dict[Hashable, _PartitionMarks] = {}

    def track(self, tp: Hashable, offset: int) -> None:
        """Record that ``offset`` of ``tp`` was read and is now in flight."""
        marks = self._parts.get(tp)
        if marks is None:
            marks = self._parts[tp] = _PartitionMarks()
        if marks.next_offset is not None and offset < marks.next_offset:
            # Re-delivery after a seek (rebalance): start over from here.
            marks.pending.clear()
            marks.done.clear()
        marks.pending.append(offset)
        marks.next_offset = offset + 1

    def finish(self, tp: Hashable, offset: int) -> None:
        """Record that ``offset`` is answered (its result or dead letter is on the broker)."""
        marks = self._parts.get(tp)
        if marks is None or marks.next_offset is None:
            return
        if offset >= marks.next_offset or not marks.pending or offset < marks.pending[0]:
            # Not in flight: already below the mark (a second answer), or read before a seek
            # back and not read again yet (its re-delivered copy is finished on its own).
            # Recording it would leak in ``done`` and make ``in_flight`` undercount.
            return
        marks.done.add(offset)

    def in_flight(self, tp: Hashable | None = None) -> int:
        parts = self._parts.values() if tp is None else [self._parts.get(tp)]
        return sum(len(m.pending) - len(m.done) for m in parts if m is not None)

    def committable(self) -> dict[Hashable, int]:
        """Watermarks that moved since the last call (offsets to commit)."""
        moved: dict[Hashable, int] = {}
        for tp, marks in self._parts.items():
            mark = marks.watermark()
            if mark is not None and mark != marks.committed:
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
