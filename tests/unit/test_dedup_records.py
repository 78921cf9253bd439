"""AnsweredIndex (bounded memory of answered ids) and the result / dead-letter builders.

Every record the builders produce must go through the real Avro codec and come back equal.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.errors import EngineError
from inference.types import BatchOutcome, Completion
from schemas.codec import AvroCodec
from streams.dedup import AnsweredIndex
from streams.records import SourceRecord, dead_letter, now_ms, result_record

CODEC = AvroCodec.default()


def round_trip(name: str, record: dict[str, Any]) -> dict[str, Any]:
    data = CODEC.encode(name, record)
    return CODEC.decode_as(data, name)


# -- AnsweredIndex ---------------------------------------------------------------------------


def test_index_remembers_what_was_added() -> None:
    index = AnsweredIndex(capacity=10)
    assert "a" not in index
    index.add("a")
    index.add("b")
    assert "a" in index and "b" in index and "c" not in index
    assert len(index) == 2


def test_index_forgets_the_oldest_beyond_capacity() -> None:
    index = AnsweredIndex(capacity=3)
    for rid in ("a", "b", "c", "d"):
        index.add(rid)
    assert len(index) == 3
    assert "a" not in index
    assert all(rid in index for rid in ("b", "c", "d"))
    index.add("e")
    assert "b" not in index and "e" in index


def test_index_adding_again_refreshes_the_id() -> None:
    index = AnsweredIndex(capacity=3)
    for rid in ("a", "b", "c"):
        index.add(rid)
    index.add("a")  # "a" is now the newest
    assert len(index) == 3
    index.add("d")
    assert "a" in index
    assert "b" not in index


@pytest.mark.parametrize("capacity", [0, -1])
def test_index_with_no_capacity_remembers_nothing(capacity: int) -> None:
    index = AnsweredIndex(capacity=capacity)
    index.add("a")
    assert "a" not in index
    assert len(index) == 0


def test_index_non_string_lookup_is_false() -> None:
    index = AnsweredIndex(capacity=2)
    index.add("1")
    assert 1 not in index
    assert None not in index


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(1, 8),
    ids=st.lists(st.text(alphabet="abcdefghij", min_size=1, max_size=2), max_size=60),
)
def test_index_matches_a_reference_lru(capacity: int, ids: list[str]) -> None:
    index = AnsweredIndex(capacity=capacity)
    reference: list[str] = []
    for rid in ids:
        index.add(rid)
        if rid in reference:
            reference.remove(rid)
        reference.append(rid)
        del reference[:-capacity]
        assert len(index) == len(reference) <= capacity
    for rid in set(ids):
        assert (rid in index) == (rid in reference)


# -- result_record ---------------------------------------------------------------------------

COMPLETION = Completion(text="Paris.", finish_reason="stop", prompt_tokens=12, completion_tokens=3)


def build(outcome: BatchOutcome | None, **kwargs: Any) -> dict[str, Any]:
    created = now_ms() - 1_500
    defaults: dict[str, Any] = {
        "request_id": "r-1",
        "model": "smol",
        "model_version": "v1",
        "outcome": outcome,
        "created_ms": created,
        "read_ms": created + 200,
        "worker": "w-0",
    }
    defaults.update(kwargs)
    return result_record(**defaults)


def test_ok_result() -> None:
    outcome = BatchOutcome(COMPLETION, None, batch_size=4, batch_wait_s=0.02, inference_s=0.5)
    before = now_ms()
    record = build(outcome)
    after = now_ms()
    assert record["status"] == "OK"
    assert record["text"] == "Paris."
    assert record["finish_reason"] == "stop"
    assert record["prompt_tokens"] == 12
    assert record["completion_tokens"] == 3
    assert record["batch_size"] == 4
    assert record["error"] is None
    assert record["request_id"] == "r-1"
    assert record["model"] == "smol" and record["model_version"] == "v1"
    assert record["worker"] == "w-0"
    assert before <= record["created_at"] <= after
    timings = record["timings"]
    assert timings["queue_ms"] == pytest.approx(200.0)
    assert timings["batch_wait_ms"] == pytest.approx(20.0)
    assert timings["inference_ms"] == pytest.approx(500.0)
    assert timings["total_ms"] >= 1_500.0
    assert round_trip("InferenceResult", record) == record


def test_error_result_names_the_error() -> None:
    outcome = BatchOutcome(
        None, EngineError("boom"), batch_size=2, batch_wait_s=0.0, inference_s=0.1
    )
    record = build(outcome)
    assert record["status"] == "ERROR"
    assert record["finish_reason"] == "error"
    assert record["text"] == ""
    assert record["error"] == "EngineError: boom"
    assert record["batch_size"] == 2
    assert round_trip("InferenceResult", record) == record


def test_result_without_outcome_is_an_error() -> None:
    record = build(None)
    assert record["status"] == "ERROR"
    assert record["error"] == "unknown error"
    assert record["batch_size"] == 0
    assert record["timings"]["batch_wait_ms"] == 0.0
    assert record["timings"]["inference_ms"] == 0.0
    assert round_trip("InferenceResult", record) == record


def test_expired_by_flag() -> None:
    record = build(None, expired=True)
    assert record["status"] == "EXPIRED"
    assert record["finish_reason"] == "expired"
    assert record["error"]
    assert record["text"] == ""
    assert round_trip("InferenceResult", record) == record


def test_expired_by_outcome() -> None:
    outcome = BatchOutcome(None, None, 0, batch_wait_s=0.3, inference_s=0.0, expired=True)
    record = build(outcome)
    assert record["status"] == "EXPIRED"
    assert record["finish_reason"] == "expired"
    assert record["timings"]["batch_wait_ms"] == pytest.approx(300.0)
    assert round_trip("InferenceResult", record) == record


def test_expired_wins_over_a_completion() -> None:
    outcome = BatchOutcome(COMPLETION, None, 1, 0.0, 0.0)
    assert build(outcome, expired=True)["status"] == "EXPIRED"


def test_timings_are_never_negative_with_skewed_clocks() -> None:
    """A producer clock ahead of ours (created_at in the future) must not go negative."""
    future = now_ms() + 60_000
    outcome = BatchOutcome(COMPLETION, None, 1, 0.0, 0.0)
    record = build(outcome, created_ms=future, read_ms=future - 5_000)
    assert all(value >= 0.0 for value in record["timings"].values())
    assert round_trip("InferenceResult", record) == record


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(["ok", "error", "expired", "none"]),
    text=st.text(max_size=40),
    tokens=st.tuples(st.integers(0, 4096), st.integers(0, 4096)),
    batch_size=st.integers(0, 256),
    waits=st.tuples(st.floats(0, 100), st.floats(0, 100)),
    created_offset_ms=st.integers(-(10**7), 10**7),
    read_after_ms=st.integers(-(10**5), 10**5),
    request_id=st.text(min_size=1, max_size=20),
)
def test_every_result_record_encodes_and_decodes_equal(
    kind: str,
    text: str,
    tokens: tuple[int, int],
    batch_size: int,
    waits: tuple[float, float],
    created_offset_ms: int,
    read_after_ms: int,
    request_id: str,
) -> None:
    completion = Completion(text, "length", *tokens)
    outcome = {
        "ok": BatchOutcome(completion, None, batch_size, *waits),
        "error": BatchOutcome(None, ValueError(text), batch_size, *waits),
        "expired": BatchOutcome(None, None, 0, waits[0], 0.0, expired=True),
        "none": None,
    }[kind]
    created = now_ms() + created_offset_ms
    record = result_record(
        request_id=request_id,
        model="m",
        model_version="v",
        outcome=outcome,
        created_ms=created,
        read_ms=created + read_after_ms,
        worker="w",
    )
    assert (
        record["status"]
        == {"ok": "OK", "error": "ERROR", "expired": "EXPIRED", "none": "ERROR"}[kind]
    )
    assert all(value >= 0.0 for value in record["timings"].values())
    assert round_trip("InferenceResult", record) == record


# -- dead_letter -----------------------------------------------------------------------------


def source(key: bytes | None = b"r-1", value: bytes | None = b"\x00\x00\x00\x00\x01junk"):
    return SourceRecord(
        tp=("llm.requests", 3),
        topic="llm.requests",
        partition=3,
        offset=123_456_789_012,
        key=key,
        value=value,
        timestamp_ms=1_700_000_000_000,
    )


def test_dead_letter_fields() -> None:
    before = now_ms()
    record = dead_letter(
        source(), "bad_sampling", "top_p=0 is outside (0, 1]", request_id="r-1", worker="w-0"
    )
    after = now_ms()
    assert record["reason_code"] == "bad_sampling"
    assert record["reason"] == "top_p=0 is outside (0, 1]"
    assert record["source_topic"] == "llm.requests"
    assert record["source_partition"] == 3
    assert record["source_offset"] == 123_456_789_012
    assert record["original_key"] == b"r-1"
    assert record["original_value"] == b"\x00\x00\x00\x00\x01junk"
    assert record["request_id"] == "r-1"
    assert record["worker"] == "w-0"
    assert before <= record["created_at"] <= after
    assert round_trip("DeadLetter", record) == record


def test_dead_letter_without_key_value_or_request_id() -> None:
    record = dead_letter(
        source(key=None, value=None),
        "undecodable",
        "value is null",
        request_id=None,
        worker="w-1",
    )
    assert record["original_key"] is None
    assert record["original_value"] is None
    assert record["request_id"] is None
    assert round_trip("DeadLetter", record) == record


@settings(max_examples=100, deadline=None)
@given(
    key=st.none() | st.binary(max_size=40),
    value=st.none() | st.binary(max_size=200),
    reason=st.text(max_size=80),
    request_id=st.none() | st.text(max_size=20),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**63 - 1),
)
def test_every_dead_letter_encodes_and_decodes_equal(
    key: bytes | None,
    value: bytes | None,
    reason: str,
    request_id: str | None,
    partition: int,
    offset: int,
) -> None:
    src = SourceRecord(("t", partition), "t", partition, offset, key, value, 0)
    record = dead_letter(src, "undecodable", reason, request_id=request_id, worker="w")
    assert round_trip("DeadLetter", record) == record
