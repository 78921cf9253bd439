"""The feedback join logic on a plain dict table, with the real redactor."""

from __future__ import annotations

from typing import Any

import pytest

from streams.feedback import FeedbackJoiner

MINUTE = 60_000
WINDOW, WAIT = 60 * MINUTE, 5 * MINUTE


@pytest.fixture
def joiner() -> FeedbackJoiner:
    from streams.redaction import Redactor

    return FeedbackJoiner({}, Redactor(), window_ms=WINDOW, wait_ms=WAIT)


def request(rid: str, prompt: str = "What is Kafka?") -> dict[str, Any]:
    return {
        "request_id": rid,
        "prompt": prompt,
        "model": "m",
        "system": None,
        "sampling": {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": None},
        "created_at": 1,
    }


def result(rid: str, text: str = "A log.") -> dict[str, Any]:
    return {
        "request_id": rid,
        "status": "OK",
        "text": text,
        "model": "m",
        "model_version": "v1",
        "finish_reason": "stop",
        "created_at": 2,
    }


def feedback(rid: str, score: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": rid,
        "score": score,
        "label": None,
        "correction": None,
        "user": "u1",
        "created_at": 3,
        "metadata": {},
        **extra,
    }


def test_feedback_after_result_joins_at_once(joiner: FeedbackJoiner) -> None:
    assert joiner.on_request(0, 1_000, request("a")) == []
    assert joiner.on_result(0, 2_000, result("a")) == []
    [emit] = joiner.on_feedback(0, 3_000, feedback("a", correction="A distributed log."))
    assert emit.kind == "training" and emit.key == b"a"
    ex = emit.record
    assert (ex["prompt"], ex["response"], ex["correction"]) == (
        "What is Kafka?",
        "A log.",
        "A distributed log.",
    )
    assert (ex["score"], ex["model_version"], ex["max_new_tokens"]) == (1, "v1", 16)
    assert joiner.counts["joined"] == 1


def test_pii_is_redacted_before_it_leaves(joiner: FeedbackJoiner) -> None:
    joiner.on_request(0, 1, request("p", "Mail jane.doe@example.com or call +1 415 555 2671"))
    joiner.on_result(0, 2, result("p", "Card 4111 1111 1111 1111 from 10.1.2.3"))
    [emit] = joiner.on_feedback(
        0, 3, feedback("p", correction="Write to bob@corp.io", user="jane.doe@example.com")
    )
    text = " ".join(str(emit.record[k]) for k in ("prompt", "response", "correction", "user"))
    for secret in ("jane.doe@example.com", "555 2671", "4111 1111", "10.1.2.3", "bob@corp.io"):
        assert secret not in text
    assert emit.record["redactions"]["email"] == 2
    assert emit.record["user"].startswith("u-")


def test_early_feedback_waits_for_its_result(joiner: FeedbackJoiner) -> None:
    joiner.on_request(0, 1_000, request("e"))
    assert joiner.on_feedback(0, 1_500, feedback("e")) == []
    assert joiner.counts["early"] == 1
    [emit] = joiner.on_result(0, 2_000, result("e"))
    assert emit.kind == "training" and emit.record["request_id"] == "e"


def test_feedback_before_its_request_also_waits(joiner: FeedbackJoiner) -> None:
    assert joiner.on_feedback(0, 1_000, feedback("x")) == []
    joiner.on_request(0, 1_100, request("x"))
    [emit] = joiner.on_result(0, 1_200, result("x"))
    assert emit.kind == "training"


def test_unknown_request_is_dead_lettered_after_the_wait(joiner: FeedbackJoiner) -> None:
    joiner.on_feedback(0, 1_000, feedback("ghost"))
    joiner.on_request(0, 1_000 + WAIT - 1, request("other"))
    assert joiner.sweep(0) == []
    joiner.on_request(0, 1_000 + WAIT + 1, request("other2"))
    [emit] = joiner.sweep(0)
    assert emit.kind == "dlq" and emit.record["reason_code"] == "unknown_request"
    assert joiner.counts["dlq:unknown_request"] == 1


def test_late_feedback_is_outside_the_window(joiner: FeedbackJoiner) -> None:
    joiner.on_request(0, 0, request("old"))
    joiner.on_result(0, 1, result("old"))
    joiner.on_request(0, WINDOW + 10, request("tick"))  # the clock moves past the window
    assert joiner.sweep(0) == []
    assert joiner.table["old"].get("expired_ms") is not None, "tombstoned, not forgotten"
    [emit] = joiner.on_feedback(0, WINDOW + 20, feedback("old"))
    assert emit.record["reason_code"] == "outside_window"
    joiner.on_request(0, 3 * WINDOW, request("tick2"))
    joiner.sweep(0)
    assert "old" not in joiner.table, "tombstones are deleted after another window"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ({"score": 5}, "bad_score"),
        ({"score": None}, "bad_score"),
        ({"request_id": ""}, "invalid_feedback"),
        ({"correction": "x" * 20_000}, "invalid_feedback"),
    ],
)
def test_bad_feedback_is_dead_lettered(joiner: FeedbackJoiner, bad: dict, code: str) -> None:
    [emit] = joiner.on_feedback(0, 1, {**feedback("a"), **bad})
    assert emit.kind == "dlq" and emit.record["reason_code"] == code


def test_partitions_have_their_own_clocks(joiner: FeedbackJoiner) -> None:
    joiner.on_feedback(0, 1_000, feedback("p0"))
    joiner.on_request(1, 10 * WAIT, request("p1"))  # partition 1's clock moves
    assert joiner.sweep(0) == [] and joiner.sweep(1) == []


def test_a_short_wait_is_not_stuck_behind_a_long_window(joiner: FeedbackJoiner) -> None:
    # The request schedules a check a window away; the parked feedback one wait away.
    # The earlier deadline must fire first even though it was scheduled later.
    joiner.on_request(0, 1_000, request("known"))
    joiner.on_feedback(0, 2_000, feedback("ghost"))
    joiner.on_request(0, 2_000 + WAIT + 1, request("tick"))
    [emit] = joiner.sweep(0)
    assert emit.record["reason_code"] == "unknown_request"
