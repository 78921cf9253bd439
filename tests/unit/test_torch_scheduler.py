"""The torch engine's in-flight batching policy, on plain values (no model, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from inference.backends.torch_scheduler import (
    InflightScheduler,
    RowMove,
    SchedulerLimits,
    SequenceState,
    StopWatcher,
)

# A toy vocabulary: id -> text. 7 and 8 are the two halves of one UTF-8 character ("é"),
# which a byte-level tokenizer decodes to U+FFFD until both are there; 0 is special.
VOCAB = {0: "", 1: "a", 2: "b", 3: " ", 4: "STOP", 5: "ST", 6: "OP", 9: "c"}


def decode(ids: Sequence[int]) -> str:
    out, pending = [], False
    for i in ids:
        if i == 7:
            pending = True
        elif i == 8 and pending:
            out.append("é")
            pending = False
        else:
            if pending:
                out.append("\ufffd")
                pending = False
            out.append(VOCAB.get(i, "?"))
    if pending:
        out.append("\ufffd")
    return "".join(out)


class CountingDecode:
    def __init__(self) -> None:
        self.tokens_decoded = 0

    def __call__(self, ids: Sequence[int]) -> str:
        self.tokens_decoded += len(ids)
        return decode(ids)


def seq(
    name: str = "s", prompt: int = 4, new: int = 8, *, stops: tuple[str, ...] = ()
) -> SequenceState:
    watcher = StopWatcher(stops, decode) if stops else None
    return SequenceState(name, prompt, new, end_ids=frozenset({99}), watcher=watcher)


# -- stop strings --------------------------------------------------------------------------


def test_stop_string_split_across_tokens_is_found() -> None:
    watcher = StopWatcher(["STOP"], decode)
    assert not watcher.push(1)
    assert not watcher.push(5)  # "aST"
    assert watcher.push(6)  # "aSTOP"
    assert watcher.text == "aSTOP"


def test_stop_watcher_text_equals_the_full_decode() -> None:
    ids = [1, 3, 7, 8, 2, 0, 9, 7, 8, 1]
    watcher = StopWatcher(["zz"], decode)
    for i in ids:
        assert not watcher.push(i)
    assert watcher.text == decode(ids)


def test_partial_character_waits_for_its_second_byte() -> None:
    watcher = StopWatcher(["é"], decode)
    assert not watcher.push(1)
    assert not watcher.push(7)  # half a character: no text yet, no match
    assert "\ufffd" not in watcher.text
    assert watcher.push(8)


def test_stop_watcher_decodes_a_few_tokens_per_step_not_the_tail() -> None:
    counting = CountingDecode()
    watcher = StopWatcher(["never"], counting)
    steps = 400
    for _ in range(steps):
        watcher.push(1)
    # Each step decodes at most a handful of ids (two short windows), not the whole tail.
    assert counting.tokens_decoded <= 4 * steps


def test_sequence_finish_reasons() -> None:
    s = seq(new=3)
    assert [s.push(1), s.push(2), s.push(1)] == [False, False, True]
    assert s.finish_reason == "length" and s.generated == [1, 2, 1]
    assert not s.push(2)  # finished: ignored
    assert s.generated == [1, 2, 1]

    eos = seq(new=5)
    eos.push(1)
    assert eos.push(99)
    assert eos.finish_reason == "stop" and eos.generated == [1]  # the end id is not kept

    stop = seq(new=5, stops=("STOP",))
    assert stop.push(1) is False
    assert stop.push(4) is True
    assert stop.finish_reason == "stop"

    last = seq(new=2, stops=("b",))
    last.push(1)
    assert last.push(2) and last.finish_reason == "stop"  # stop wins over the budget


def test_sequence_rejects_empty_prompts_and_budgets() -> None:
    with pytest.raises(ValueError):
        SequenceState("x", 0, 4)
    with pytest.raises(ValueError):
        SequenceState("x", 3, 0)


# -- admission -----------------------------------------------------------------------------


def test_idle_engine_admits_a_lone_request_at_once() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=4))
    a = seq("a")
    sched.add(a)
    assert sched.admit() == [a]
    assert a.row == 0 and sched.running == [a] and not sched.waiting


def test_admissions_are_batched_while_others_decode() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=8, admit_batch=3, admit_wait_steps=5))
    sched.add(seq("first"))
    sched.admit()
    b, c = seq("b"), seq("c")
    sched.add(b)
    sched.add(c)
    assert sched.admit() == []  # two waiting, a group is three: keep decoding
    sched.step_done()
    d = seq("d")
    sched.add(d)
    assert sched.admit() == [b, c, d]  # the group is full: one prefill for all three
    assert [s.row for s in sched.running] == [0, 1, 2, 3]


def test_a_waiting_request_joins_after_admit_wait_steps() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=8, admit_batch=4, admit_wait_steps=3))
    sched.add(seq("first"))
    sched.admit()
    late = seq("late")
    sched.add(late)
    for _ in range(3):
        assert sched.admit() == []
        sched.step_done()
    assert sched.admit() == [late]


def test_filling_every_free_slot_is_a_full_group() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=2, admit_batch=4, admit_wait_steps=99))
    sched.add(seq("first"))
    sched.admit()
    last = seq("last")
    sched.add(last)
    assert sched.admit() == [last]  # one free slot, one waiting: nothing to wait for


def test_admission_respects_slots_tokens_and_prefill_budget() -> None:
    sched = InflightScheduler(
        SchedulerLimits(max_slots=3, max_tokens=40, max_prefill_tokens=12, admit_batch=1)
    )
    seqs = [seq(f"s{i}", prompt=5, new=5) for i in range(5)]  # cost 10 each
    for s in seqs:
        sched.add(s)
    assert sched.admit() == seqs[:2]  # prefill budget: 5 + 5 <= 12 < 15
    assert sched.admit() == seqs[2:3]  # slot budget: 3 rows
    assert sched.admit() == []
    sched.retire(seqs[0])
    assert sched.admit() == seqs[3:4]
    assert sched.running_tokens == 30


def test_token_budget_blocks_the_head_and_nobody_overtakes_it() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=4, max_tokens=30, admit_batch=1))
    big, small = seq("big", prompt=10, new=10), seq("small", prompt=1, new=1)
    sched.add(seq("running", prompt=10, new=5))
    sched.admit()
    sched.add(big)
    sched.add(small)
    assert sched.admit() == []  # 15 + 20 > 30, and small stays behind big (FIFO)


def test_a_prompt_longer_than_the_prefill_budget_still_runs_alone() -> None:
    sched = InflightScheduler(SchedulerLimits(max_prefill_tokens=8, max_tokens=1000))
    long = seq("long", prompt=100, new=4)
    sched.add(long)
    sched.add(seq("after", prompt=2))
    assert sched.admit() == [long]


def test_a_request_over_the_token_budget_is_refused() -> None:
    sched = InflightScheduler(SchedulerLimits(max_tokens=10))
    with pytest.raises(ValueError, match="token budget"):
        sched.add(seq(prompt=8, new=8))
    assert sched.idle


# -- retirement ----------------------------------------------------------------------------


def test_retire_frees_the_row_at_once_and_keeps_rows_contiguous() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=4, admit_batch=1))
    a, b, c = seq("a"), seq("b", prompt=6), seq("c", prompt=9)
    for s in (a, b, c):
        sched.add(s)
    sched.admit()
    c.push(1)
    move = sched.retire(a)
    assert move == RowMove(src=2, dst=0, length=10)  # c (9 + 1 tokens) moves into row 0
    assert sched.running == [c, b] and c.row == 0 and b.row == 1 and a.row == -1
    assert sched.retire(b) is None  # the last row: nothing moves
    assert sched.running == [c]
    with pytest.raises(ValueError):
        sched.retire(a)


def test_drop_waiting_and_clear() -> None:
    sched = InflightScheduler(SchedulerLimits(max_slots=1))
    a, b = seq("a"), seq("b")
    sched.add(a)
    sched.add(b)
    sched.admit()
    assert not sched.drop_waiting(a)  # running, not waiting
    assert sched.drop_waiting(b)
    assert sched.clear() == [a]
    assert sched.idle and a.row == -1


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        SchedulerLimits(max_slots=0)
    with pytest.raises(ValueError):
        SchedulerLimits(admit_wait_steps=-1)
