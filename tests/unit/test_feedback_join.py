"""The feedback join logic on a plain dict table, with the real redactor."""

from __future__ import annotations

import json
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


# -- restarts, clocks and bounds -------------------------------------------------------------
NOW = 1_790_000_000_000  # event time in these tests (epoch ms)
SKEW = 60_000


def make_joiner(
    table: dict[str, Any] | None = None, *, wall: int = NOW + 10 * WINDOW, **options: Any
) -> FeedbackJoiner:
    """A joiner whose wall clock stands still at ``wall`` (by default well after the
    records' times, as in a replay)."""
    from streams.redaction import Redactor

    options = {"window_ms": WINDOW, "wait_ms": WAIT, "clock_skew_ms": SKEW, **options}
    return FeedbackJoiner(
        {} if table is None else table, Redactor(), wall_clock=lambda: wall, **options
    )


def restarted(before: FeedbackJoiner, partitions: set[int] | None = None) -> FeedbackJoiner:
    """A new joiner over what the changelog held (a JSON round trip of the table)."""
    recovered = json.loads(json.dumps(before.table))
    after = make_joiner(recovered, max_entry_bytes=before.max_entry_bytes)
    after.rebuild(partitions)
    return after


def test_recovered_entries_expire_after_a_restart() -> None:
    before = make_joiner()
    before.on_request(0, NOW - WINDOW, request("r"))
    before.on_result(0, NOW - WINDOW + 10, result("r"))
    after = restarted(before)
    assert after.timers(0) == {"r": NOW + 10}
    after.on_request(0, NOW + 11, request("tick"))
    assert after.sweep(0) == []
    assert after.table["r"] == {
        "partition": 0,
        "seen_ms": NOW - WINDOW + 10,
        "expired_ms": NOW + 11,
    }
    assert after.counts["expired"] == 1
    after.on_request(0, NOW + WINDOW + 11, request("tick2"))
    after.sweep(0)
    assert "r" not in after.table, "the marker is deleted after another window"


def test_parked_feedback_is_dead_lettered_after_a_restart() -> None:
    before = make_joiner()
    before.on_feedback(2, NOW, {**feedback("ghost"), "_offset": 42})
    before.on_request(2, NOW + 5, request("known"))
    before.on_feedback(2, NOW + 6, {**feedback("known"), "_offset": 43})
    after = restarted(before)
    assert after.clock(2) == NOW + 6, "the clock starts where the entries left it"
    after.on_request(2, NOW + WAIT + 10, request("tick"))
    letters = after.sweep(2)
    assert sorted((e.record["reason_code"], e.record["source_offset"]) for e in letters) == [
        ("no_result", 43),
        ("unknown_request", 42),
    ]
    assert {e.record["source_partition"] for e in letters} == {2}
    assert letters[0].record["feedback"]["request_id"] in {"ghost", "known"}
    assert "_offset" not in letters[0].record["feedback"]


def test_a_redelivered_feedback_is_parked_once() -> None:
    joiner = make_joiner()
    joiner.on_feedback(0, NOW, {**feedback("g"), "_offset": 7})
    after = restarted(joiner)
    assert after.on_feedback(0, NOW + 1, {**feedback("g"), "_offset": 7}) == []
    assert len(after.table["g"]["pending"]) == 1 and after.counts["redelivered"] == 1
    after.on_request(0, NOW + WAIT + 10, request("tick"))
    assert len(after.sweep(0)) == 1


def test_rebuild_keeps_to_the_owned_partitions() -> None:
    before = make_joiner()
    before.on_request(0, NOW, request("mine"))
    before.on_request(3, NOW, request("theirs"))
    before.table["legacy"] = {"seen_ms": NOW, "request": before.table["mine"]["request"]}
    after = make_joiner(json.loads(json.dumps(before.table)))
    foreign = after.rebuild({0}, partition_of=lambda rid: 0)
    assert foreign == ["theirs"]
    assert set(after.timers(0)) == {"mine", "legacy"} and after.timers(3) == {}


def test_without_a_rebuild_nothing_would_expire() -> None:
    # Guards the test above it: a joiner that skipped the rebuild keeps the entry forever.
    before = make_joiner()
    before.on_request(0, NOW - WINDOW, request("r"))
    forgetful = make_joiner(json.loads(json.dumps(before.table)))
    forgetful.on_request(0, NOW + WINDOW, request("tick"))
    forgetful.sweep(0)
    assert "request" in forgetful.table["r"]


def test_a_far_future_timestamp_cannot_push_the_clock() -> None:
    joiner = make_joiner(wall=NOW)
    joiner.on_request(1, NOW, request("a"))
    joiner.on_result(1, NOW + 1, result("a"))
    joiner.on_request(1, NOW + 365 * 24 * 3600 * 1000, request("from-the-future"))
    assert joiner.clock(1) == NOW + SKEW and joiner.counts["future_timestamp"] == 1
    assert joiner.sweep(1) == [], "nothing expired by the bad timestamp"
    [emit] = joiner.on_feedback(1, NOW + 2, feedback("a"))
    assert emit.kind == "training"
    assert joiner.table["from-the-future"]["seen_ms"] == NOW + SKEW


def test_a_slightly_fast_producer_clock_still_counts() -> None:
    joiner = make_joiner(wall=NOW)
    joiner.on_request(0, NOW + SKEW // 2, request("a"))
    assert joiner.clock(0) == NOW + SKEW // 2 and joiner.counts["future_timestamp"] == 0


LIMIT = 8_192


@pytest.mark.parametrize("filler", ["word ", "é mot ", "🙂 "])
def test_a_huge_prompt_and_answer_are_truncated_to_the_bound(filler: str) -> None:
    from streams.feedback import TRUNCATED, entry_bytes

    joiner = make_joiner(max_entry_bytes=LIMIT)
    prompt = "Mail jane.doe@example.com " + filler * 40_000
    joiner.on_request(0, NOW, {**request("big"), "system": filler * 30_000, "prompt": prompt})
    joiner.on_result(0, NOW + 1, result("big", text=filler * 50_000))
    stored = joiner.table["big"]
    assert entry_bytes(stored) <= LIMIT
    assert stored["request"]["prompt"].startswith("Mail jane.doe@example.com ")
    assert stored["request"]["prompt"].endswith(TRUNCATED)
    assert stored["result"]["text"].endswith(TRUNCATED)
    assert joiner.counts["truncated"] == 2  # once per write that had to cut
    [emit] = joiner.on_feedback(0, NOW + 2, feedback("big", correction="Short."))
    assert emit.record["prompt"].startswith("Mail [EMAIL] ")
    assert emit.record["prompt"].endswith(TRUNCATED) and emit.record["correction"] == "Short."


def test_a_cut_never_leaves_half_a_word() -> None:
    from streams.feedback import TRUNCATED

    joiner = make_joiner(max_entry_bytes=LIMIT)
    joiner.on_request(0, NOW, request("w", " ".join(f"card-{i:06d}" for i in range(5_000))))
    kept = joiner.table["w"]["request"]["prompt"].removesuffix(TRUNCATED)
    assert kept.split(" ")[-1].startswith("card-") and len(kept.split(" ")[-1]) == 11


def test_parked_feedback_with_huge_metadata_fits_and_is_still_dead_lettered() -> None:
    from streams.feedback import METADATA_DROPPED, entry_bytes

    joiner = make_joiner(max_entry_bytes=LIMIT)
    metadata = {f"k{i}": "v" * 100 for i in range(2_000)}
    assert joiner.on_feedback(0, NOW, {**feedback("m", metadata=metadata), "_offset": 5}) == []
    assert entry_bytes(joiner.table["m"]) <= LIMIT
    assert joiner.table["m"]["pending"][0]["metadata"] == {METADATA_DROPPED: "2000 entries"}
    joiner.on_request(0, NOW + WAIT, request("tick"))
    [letter] = joiner.sweep(0)
    assert letter.record["reason_code"] == "unknown_request"
    assert letter.record["source_offset"] == 5


def test_a_flood_of_early_feedback_is_bounded() -> None:
    from streams.feedback import entry_bytes

    joiner = make_joiner(max_entry_bytes=LIMIT)
    letters = []
    for i in range(200):
        letters += joiner.on_feedback(0, NOW + i, {**feedback("f", label="x" * 40), "_offset": i})
        assert entry_bytes(joiner.table["f"]) <= LIMIT
    parked = len(joiner.table["f"]["pending"])
    assert 0 < parked < 200 and len(letters) == 200 - parked
    assert {e.record["reason_code"] for e in letters} == {"entry_too_large"}
    assert joiner.counts["early"] == parked


def test_fit_entry_holds_its_bound_on_random_entries() -> None:
    import random

    from streams.feedback import entry_bytes, fit_entry

    rng = random.Random(7)
    pieces = ["ab ", "cd", "éf ", "🙂", "\n", '"', "\\", "word "]
    for _ in range(200):

        def text() -> str:
            return "".join(rng.choices(pieces, k=rng.randrange(0, 6_000)))

        entry = {
            "partition": 0,
            "seen_ms": NOW,
            "request": {"prompt": text(), "system": text() if rng.random() < 0.5 else None},
            "result": {"text": text()},
            "pending": [
                {**feedback("r", correction=text(), metadata={"a": text()}), "_parked_ms": NOW}
                for _ in range(rng.randrange(0, 4))
            ],
        }
        limit = rng.choice([4_096, 10_000, 50_000])
        fitted, _, dropped = fit_entry(entry, limit)
        assert entry_bytes(fitted) <= limit
        assert len(fitted.get("pending", [])) + len(dropped) == len(entry["pending"])


def test_the_changelog_json_is_within_the_bound() -> None:
    # What Faust writes (its json codec) is no longer than what the bound measures.
    from faust.utils import json as faust_json

    from streams.feedback import entry_bytes

    joiner = make_joiner(max_entry_bytes=LIMIT)
    joiner.on_request(0, NOW, request("j", "日本語のテキスト🙂 " * 5_000))
    value = joiner.table["j"]
    written = faust_json.dumps(value)
    assert len(written if isinstance(written, bytes) else written.encode()) <= entry_bytes(value)
    assert entry_bytes(value) <= LIMIT


def test_a_delayed_dead_letter_names_the_feedbacks_own_offset() -> None:
    from schemas.codec import AvroCodec
    from streams.feedback_join import _feedback_source
    from streams.records import SourceRecord
    from streams.settings import Settings

    settings = Settings(kafka_bootstrap="127.0.0.1:1")
    codec = AvroCodec.default()
    joiner = make_joiner()
    joiner.on_feedback(1, NOW, {**feedback("late"), "_offset": 17})
    joiner.on_result(1, NOW + WAIT + 1, result("other"))
    [emit] = joiner.sweep(1)
    reading = SourceRecord("tp", settings.results_topic, 1, 900, b"other", b"result", NOW)
    source = _feedback_source(emit, reading, codec, settings)
    assert (source.topic, source.partition, source.offset) == (settings.feedback_topic, 1, 17)
    _, original = codec.decode(source.value, expected="FeedbackEvent")
    assert original["request_id"] == "late" and original["score"] == 1

    [now_emit] = joiner.on_feedback(1, NOW, {**feedback("x", score=5), "_offset": 18})
    raw = codec.encode("FeedbackEvent", {**feedback("x"), "score": 5})
    reading = SourceRecord("tp", settings.feedback_topic, 1, 18, b"x", raw, NOW)
    source = _feedback_source(now_emit, reading, codec, settings)
    assert (source.offset, source.value) == (18, raw), "decided on reading: its own bytes"


def test_feedback_parked_on_an_old_entry_keeps_it_until_its_wait_is_over() -> None:
    joiner = make_joiner()
    joiner.on_request(0, NOW, request("slow"))  # no result yet
    joiner.on_feedback(0, NOW + WINDOW - 1, {**feedback("slow"), "_offset": 3})
    joiner.on_request(0, NOW + WINDOW + 1, request("tick"))
    assert joiner.sweep(0) == [], "past its window, but its feedback still waits"
    assert joiner.timers(0)["slow"] == NOW + WINDOW - 1 + WAIT
    joiner.on_request(0, NOW + WINDOW + WAIT, request("tick2"))
    [letter] = joiner.sweep(0)
    assert letter.record["reason_code"] == "no_result"
    assert joiner.table["slow"]["expired_ms"] == NOW + WINDOW + WAIT
