"""OffsetWatermarks: commit only up to the lowest unfinished offset of each partition."""

from __future__ import annotations

from collections.abc import Hashable

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.watermarks import OffsetWatermarks, Tracked

TP = ("llm.requests", 0)
TP1 = ("llm.requests", 1)


def commit(marks: OffsetWatermarks) -> dict[Hashable, int]:
    """What a commit loop does: take the moved watermarks and record them as committed."""
    moved = marks.committable()
    marks.mark_committed(moved)
    return moved


def test_nothing_tracked_nothing_to_commit() -> None:
    marks = OffsetWatermarks()
    assert marks.committable() == {}
    assert marks.in_flight() == 0


def test_in_order_finish_moves_the_mark_one_by_one() -> None:
    marks = OffsetWatermarks()
    for offset in range(10, 13):
        marks.track(TP, offset)
    assert marks.committable() == {TP: 10}  # nothing finished: "everything below 10"
    marks.finish(TP, 10)
    assert marks.committable() == {TP: 11}
    marks.finish(TP, 11)
    assert marks.committable() == {TP: 12}
    marks.finish(TP, 12)
    assert marks.committable() == {TP: 13}  # all answered: the next offset to read
    assert marks.in_flight(TP) == 0


def test_out_of_order_finish_commits_only_below_the_lowest_unfinished() -> None:
    marks = OffsetWatermarks()
    for offset in range(5):
        marks.track(TP, offset)
    for offset in (4, 2, 3):
        marks.finish(TP, offset)
    assert marks.committable() == {TP: 0}
    assert marks.in_flight(TP) == 2
    marks.finish(TP, 1)
    assert marks.committable() == {TP: 0}  # 0 still unfinished
    marks.finish(TP, 0)
    assert marks.committable() == {TP: 5}  # jumps over everything already done
    assert marks.in_flight(TP) == 0


def test_gaps_in_offsets_hold_the_mark_until_closed() -> None:
    """Offsets need not be contiguous (transaction markers), but a gap may also be records
    that were never delivered: it holds the mark until the pipeline has read it."""
    marks = OffsetWatermarks()
    assert marks.track(TP, 3) == Tracked(False, None)  # first record, no committed offset
    assert marks.track(TP, 7) == Tracked(False, (4, 7))
    marks.finish(TP, 3)
    assert marks.committable() == {TP: 4}  # not past the hole
    assert marks.track(TP, 8).hole is None
    assert marks.track(TP, 20).hole == (9, 20)
    assert marks.holes(TP) == [(4, 7), (9, 20)]
    marks.finish(TP, 8)
    marks.finish(TP, 7)
    assert marks.committable() == {TP: 4}
    marks.close_hole(TP, (4, 7))  # it held only markers
    assert marks.committable() == {TP: 9}
    marks.track(TP, 12)  # read from the hole: open until answered
    marks.close_hole(TP, (9, 20))
    assert marks.committable() == {TP: 12}
    marks.finish(TP, 12)
    assert marks.committable() == {TP: 20}
    marks.finish(TP, 20)
    assert marks.committable() == {TP: 21}


def test_a_first_record_after_the_committed_offset_is_a_hole() -> None:
    marks = OffsetWatermarks()
    marks.start(TP, 10)
    assert marks.knows(TP)
    assert marks.track(TP, 15).hole == (10, 15)
    marks.finish(TP, 15)
    assert marks.committable() == {}  # 10 is committed already; the hole holds it there
    marks.close_hole(TP, (10, 15))
    assert marks.committable() == {TP: 16}
    marks.close_hole(("other", 0), (1, 2))  # unknown partitions are ignored


def test_a_first_record_at_or_before_the_committed_offset_is_no_hole() -> None:
    marks = OffsetWatermarks()
    marks.start(TP, 10)
    assert marks.track(TP, 10) == Tracked(False, None)
    other = OffsetWatermarks()
    other.start(TP1, 10)
    assert other.track(TP1, 8) == Tracked(False, None)  # re-reads below the commit: fine
    assert other.committable() == {}  # never below the group's committed offset
    other.finish(TP1, 8)
    assert other.committable() == {}  # 9 < 10
    other.track(TP1, 9)
    other.track(TP1, 10)
    other.finish(TP1, 9)
    other.finish(TP1, 10)
    assert other.committable() == {TP1: 11}


def test_partitions_are_independent() -> None:
    marks = OffsetWatermarks()
    for offset in range(3):
        marks.track(TP, offset)
        marks.track(TP1, 100 + offset)
    marks.finish(TP, 0)
    marks.finish(TP, 1)
    marks.finish(TP1, 101)  # partition 1's 100 is still open
    assert marks.committable() == {TP: 2, TP1: 100}
    assert marks.in_flight(TP) == 1
    assert marks.in_flight(TP1) == 2
    assert marks.in_flight() == 3
    marks.finish(TP1, 100)
    assert marks.committable()[TP1] == 102
    assert marks.committable()[TP] == 2


def test_committable_returns_only_partitions_that_moved() -> None:
    marks = OffsetWatermarks()
    marks.track(TP, 0)
    marks.track(TP1, 0)
    assert commit(marks) == {TP: 0, TP1: 0}
    assert marks.committable() == {}  # nothing moved since
    marks.finish(TP, 0)
    assert commit(marks) == {TP: 1}
    assert marks.committable() == {}
    marks.finish(TP1, 0)
    assert commit(marks) == {TP1: 1}


def test_without_mark_committed_the_same_offsets_stay_committable() -> None:
    """A failed commit (mark_committed not called) is offered again next time."""
    marks = OffsetWatermarks()
    marks.track(TP, 0)
    marks.finish(TP, 0)
    assert marks.committable() == {TP: 1}
    assert marks.committable() == {TP: 1}
    marks.mark_committed({TP: 1})
    assert marks.committable() == {}


def test_mark_committed_ignores_unknown_partitions() -> None:
    marks = OffsetWatermarks()
    marks.mark_committed({("other", 9): 5})
    assert marks.committable() == {}


def test_finish_for_an_unknown_partition_is_ignored() -> None:
    marks = OffsetWatermarks()
    marks.finish(TP, 3)
    assert marks.committable() == {}
    assert marks.in_flight() == 0


def test_forget_drops_a_partition() -> None:
    marks = OffsetWatermarks()
    marks.track(TP, 0)
    marks.track(TP1, 0)
    marks.forget([TP])
    assert marks.committable() == {TP1: 0}
    assert marks.in_flight() == 1
    marks.finish(TP, 0)  # a late answer for a revoked partition changes nothing
    assert TP not in marks.committable()
    marks.forget([TP, ("never", 1)])  # forgetting twice or unknown is fine


def test_reassigned_partition_starts_fresh() -> None:
    marks = OffsetWatermarks()
    marks.track(TP, 0)
    marks.finish(TP, 0)
    commit(marks)
    marks.forget([TP])
    marks.track(TP, 1)
    assert marks.committable() == {TP: 1}  # new state: 1 is unfinished


def test_redelivery_after_seek_keeps_both_copies_open() -> None:
    marks = OffsetWatermarks()
    for offset in range(10, 15):
        marks.track(TP, offset)
    marks.finish(TP, 10)
    assert commit(marks) == {TP: 11}
    # A rebalance seeks back to the committed offset and the records come again.
    marks.track(TP, 11)
    assert marks.redeliveries == 1
    assert marks.in_flight(TP) == 5  # 11 twice, 12, 13, 14
    assert marks.committable() == {}  # still 11: nothing new answered
    marks.finish(TP, 11)  # one copy answered: the other is still open
    assert marks.committable() == {}
    marks.finish(TP, 11)
    assert commit(marks) == {TP: 12}
    for offset in (12, 13, 14):
        marks.finish(TP, offset)
    assert commit(marks) == {TP: 15}
    assert marks.in_flight(TP) == 0


def test_a_redelivered_offset_never_hides_earlier_unfinished_ones() -> None:
    """The bug this guards against: a re-delivery that 'starts over' forgets 0 and 1,
    then commits past them although they were never answered (lost after a crash)."""
    marks = OffsetWatermarks()
    for offset in range(5):
        marks.track(TP, offset)
    marks.track(TP, 2)  # read again, for whatever reason
    for offset in (2, 3, 4, 2):
        marks.finish(TP, offset)
    assert marks.committable() == {TP: 0}  # 0 and 1 are still unanswered
    assert marks.in_flight(TP) == 2
    marks.finish(TP, 1)
    assert commit(marks) == {TP: 0}
    marks.finish(TP, 0)
    assert commit(marks) == {TP: 5}


def test_the_watermark_never_moves_backwards() -> None:
    marks = OffsetWatermarks()
    for offset in range(3):
        marks.track(TP, offset)
        marks.finish(TP, offset)
    assert commit(marks) == {TP: 3}
    marks.track(TP, 1)  # an old offset read again below the committed mark
    assert marks.committable() == {}  # no commit of 1: everything below 3 was answered
    marks.finish(TP, 1)
    assert marks.committable() == {}
    marks.track(TP, 3)
    marks.finish(TP, 3)
    assert commit(marks) == {TP: 4}


def test_duplicate_and_stale_finishes_never_make_in_flight_negative() -> None:
    marks = OffsetWatermarks()
    for offset in range(3):
        marks.track(TP, offset)
    marks.finish(TP, 0)
    marks.finish(TP, 0)
    assert marks.in_flight(TP) == 2
    commit(marks)  # the mark passes 0
    marks.finish(TP, 0)  # a second answer for an offset already below the mark
    assert marks.in_flight(TP) == 2
    marks.finish(TP, 1)
    marks.finish(TP, 2)
    assert commit(marks) == {TP: 3}
    assert marks.in_flight(TP) == 0
    marks.finish(TP, 1)
    marks.finish(TP, 99)  # never tracked
    assert marks.in_flight(TP) == 0
    marks.track(TP, 3)
    assert marks.in_flight(TP) == 1
    assert marks.committable() == {}  # 3 is open: the mark does not pass it


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    start=st.integers(0, 10**12),
    steps=st.lists(st.integers(1, 3), min_size=1, max_size=40),
)
def test_watermark_is_never_beyond_an_unfinished_offset(
    data: st.DataObject, start: int, steps: list[int]
) -> None:
    offsets = []
    offset = start
    for step in steps:
        offsets.append(offset)
        offset += step  # gaps of up to 2 offsets
    order = data.draw(st.permutations(offsets))
    commit_every = data.draw(st.sampled_from([None, 1, 2, 5]))
    marks = OffsetWatermarks()
    for o in offsets:
        hole = marks.track(TP, o).hole
        if hole is not None:  # markers only: the pipeline finds nothing to read there
            marks.close_hole(TP, hole)
    next_offset = offsets[-1] + 1
    unfinished = set(offsets)
    last = commit(marks)[TP]
    assert last == offsets[0]
    for i, o in enumerate(order):
        marks.finish(TP, o)
        unfinished.discard(o)
        assert marks.in_flight(TP) == len(unfinished)
        if commit_every is None or i % commit_every:
            continue
        moved = commit(marks)
        expected = min(unfinished) if unfinished else next_offset
        if moved:
            assert moved[TP] > last  # a watermark only ever moves forward
            last = moved[TP]
        assert last == expected
    final = commit(marks)
    last = final.get(TP, last)
    assert last == next_offset
    assert marks.committable() == {}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_with_redeliveries_the_mark_never_passes_an_open_delivery(
    data: st.DataObject, n: int
) -> None:
    """Random interleavings of reads (with re-reads of earlier offsets) and answers."""
    marks = OffsetWatermarks()
    open_copies: list[int] = []  # one entry per delivery in flight
    answered: set[int] = set()  # offsets with at least one answered delivery
    highest = -1
    last: int | None = None
    for _ in range(data.draw(st.integers(1, 80))):
        action = data.draw(st.sampled_from(["read", "reread", "answer", "commit"]))
        if action == "read" and highest + 1 < n:
            highest += 1
            marks.track(TP, highest)
            open_copies.append(highest)
        elif action == "reread" and highest >= 0:
            offset = data.draw(st.integers(0, highest))
            marks.track(TP, offset)
            open_copies.append(offset)
        elif action == "answer" and open_copies:
            offset = open_copies.pop(data.draw(st.integers(0, len(open_copies) - 1)))
            marks.finish(TP, offset)
            answered.add(offset)
        elif action == "commit":
            moved = commit(marks).get(TP)
            if moved is not None:
                assert last is None or moved > last
                last = moved
        assert marks.in_flight(TP) == len(open_copies)
        if last is not None:
            # everything below the committed mark was answered: nothing is lost on a crash
            assert set(range(last)) <= answered
