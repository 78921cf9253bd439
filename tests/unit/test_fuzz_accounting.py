"""The fuzz run's payloads and its accounting, with plain values (no broker)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from connectors.fuzzing.check import Sent, account
from connectors.fuzzing.payloads import (
    FAMILIES,
    HOSTILE,
    Expect,
    Payload,
    bad_payload,
    decoded_id,
    generate,
)
from inference.errors import InvalidRequestError
from schemas.codec import AvroCodec
from streams.admission import Admission, AdmissionLimits

CODEC = AvroCodec.default()


def _admission() -> Admission:
    return Admission(
        AdmissionLimits(),
        served_models=lambda: {"benchmark"},
        encode=lambda p, s, r: [0] * max(1, len(p.split()) + len((s or "").split())),
    )


def test_generate_is_deterministic_mixed_and_unique() -> None:
    a = generate(600, 50, seed=3, tag="t")
    b = generate(600, 50, seed=3, tag="t")
    assert a == b
    families = Counter(p.family for p in a)
    assert families["valid"] == 50 and sum(families.values()) == 650
    assert set(families) == {"valid", *FAMILIES}
    ids = [p.request_id for p in a if p.request_id is not None and p.expect is not Expect.DLQ]
    assert len(ids) == len(set(ids)), "two answerable payloads share a request id"


def test_a_payload_that_does_not_decode_must_be_dead_lettered() -> None:
    rng = random.Random(1)
    for family in ("random", "bitflip", "truncated", "wrong_id"):
        for i in range(200):
            p = bad_payload(rng, CODEC, family, f"id-{i}", "default")
            if decoded_id(CODEC, p.value) is None:
                assert p.expect is Expect.DLQ, p
            else:
                assert p.expect is Expect.EITHER and p.request_id == decoded_id(CODEC, p.value)


@pytest.mark.parametrize("case", [c for c, _, _ in HOSTILE])
def test_hostile_expectations_agree_with_admission(case: str) -> None:
    """Each hostile case's expected reason is what admission says (the pipeline test then
    checks the pipeline delivers it)."""
    _, _change, reason = next(h for h in HOSTILE if h[0] == case)
    rng = random.Random(0)
    payload: Payload | None = None
    while payload is None or payload.case != case:
        payload = bad_payload(rng, CODEC, "hostile", "hostile-id", "default")
    _, record = CODEC.decode(payload.value, expected="InferenceRequest")
    try:
        _admission().admit(record, record_timestamp_ms=1)
        got = None
    except InvalidRequestError as exc:
        got = exc.reason_code
    assert got == reason
    assert payload.expect is (Expect.ANSWER if reason is None else Expect.DLQ)


def _sent(*payloads: Payload) -> list[Sent]:
    return [Sent(p, 0, i) for i, p in enumerate(payloads)]


def _p(family: str, expect: Expect, rid: str | None, reason: str | None = None) -> Payload:
    return Payload(family, family, None, b"x", expect, rid, reason)


def test_every_payload_answered_once_passes() -> None:
    sent = _sent(
        _p("valid", Expect.ANSWER, "a"),
        _p("random", Expect.DLQ, None),
        _p("bitflip", Expect.EITHER, "c"),
        _p("bitflip", Expect.EITHER, "d"),
        _p("hostile", Expect.DLQ, "e", "bad_seed"),
    )
    tally = account(
        sent,
        results=[{"request_id": "a", "status": "OK"}, {"request_id": "c", "status": "OK"}],
        letters=[
            {
                "source_partition": 0,
                "source_offset": 1,
                "reason_code": "undecodable",
                "reason": "x",
            },
            {
                "source_partition": 0,
                "source_offset": 3,
                "reason_code": "unknown_model",
                "reason": "m",
            },
            {"source_partition": 0, "source_offset": 4, "reason_code": "bad_seed", "reason": "s"},
        ],
    )
    assert tally.problems() == []
    summary = tally.summary()
    assert summary["missing"] == summary["duplicates"] == summary["wrong"] == 0
    assert summary["must_dlq"] == summary["must_dlq_in_dlq"] == 2
    assert summary["dlq_by_reason"] == {"undecodable": 1, "unknown_model": 1, "bad_seed": 1}
    assert summary["answered"] == {"still valid after mutation: OK": 1, "valid: OK": 1}


def test_missing_duplicate_wrong_and_unexpected_answers_are_problems() -> None:
    sent = _sent(
        _p("valid", Expect.ANSWER, "a"),
        _p("valid", Expect.ANSWER, "b"),
        _p("random", Expect.DLQ, None),
        _p("hostile", Expect.DLQ, "d", "bad_seed"),
        _p("valid", Expect.ANSWER, "e"),
        _p("valid", Expect.ANSWER, "f"),
    )
    letter = {"source_partition": 0, "reason": "r"}
    tally = account(
        sent,
        results=[
            {"request_id": "a", "status": "OK"},
            {"request_id": "a", "status": "OK"},  # twice
            {"request_id": "zzz", "status": "OK"},  # never sent
            {"request_id": "f", "status": "ERROR"},  # a batch-mate broke it
        ],
        letters=[
            {**letter, "source_offset": 3, "reason_code": "bad_sampling"},  # wrong reason
            {**letter, "source_offset": 4, "reason_code": "bad_seed"},  # valid, dead-lettered
            {**letter, "source_offset": 99, "reason_code": "undecodable"},  # never sent
        ],
    )
    s = tally.summary()
    assert s["missing"] == 2  # b and the random payload
    assert s["duplicates"] == 1
    assert s["wrong"] == 3
    assert s["unexpected"] == 2
    assert len(tally.problems()) == 4


def test_a_result_for_a_payload_that_must_be_dead_lettered_is_a_wrong_answer() -> None:
    tally = account(
        _sent(_p("hostile", Expect.DLQ, "h", "bad_sampling")),
        results=[{"request_id": "h", "status": "OK"}],
        letters=[],
    )
    assert tally.summary()["missing"] == 0 and tally.summary()["unexpected"] == 0
    assert [why for _, why in tally.wrong()] == ["must be dead-lettered, got result:OK"]


def test_a_dead_letter_without_a_reason_is_a_problem() -> None:
    tally = account(
        _sent(_p("random", Expect.DLQ, None)),
        results=[],
        letters=[{"source_partition": 0, "source_offset": 0, "reason_code": "x", "reason": ""}],
    )
    assert any("without a reason" in p for p in tally.problems())
