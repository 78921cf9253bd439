"""``replay`` on the real broker: windows, filters, dedup, both formats, no consumer group."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from connectors.replay import ReplayError, ReplaySummary, replay
from schemas.codec import AvroCodec, frame_header

pytestmark = pytest.mark.integration

T0 = 1_795_420_800_000  # 2026-11-23T08:00:00Z
CODEC = AvroCodec.default()
GARBAGE_P0 = b"not avro at all"
GARBAGE_P1 = frame_header(987_654) + b"\x02xx"  # framed, but no such schema id


def feedback(request_id: str, score: int, **extra: Any) -> bytes:
    return CODEC.encode(
        "FeedbackEvent",
        {"request_id": request_id, "score": score, "created_at": T0, **extra},
    )


# (partition, timestamp offset from T0 in ms, key, value); offsets follow list order.
FEEDBACK: list[tuple[int, int, bytes | None, bytes | None]] = [
    (0, 0, b"r1", feedback("r1", 1)),  # p0 @0
    (0, 1000, b"r2", feedback("r2", -1)),  # p0 @1
    (0, 2000, b"junk", GARBAGE_P0),  # p0 @2
    (0, 3000, b"r1", feedback("r1", -1, correction="A better answer")),  # p0 @3: supersedes @0
    (0, 4000, b"r3", feedback("r3", 0)),  # p0 @4
    (0, 5000, b"r4", feedback("r4", 1)),  # p0 @5
    (0, 6000, b"r4", None),  # p0 @6: a tombstone (as on compacted topics) deletes r4
    (1, 500, b"r5", feedback("r5", 1)),  # p1 @0
    (1, 1500, b"r6", feedback("r6", 0)),  # p1 @1
    (1, 2500, None, GARBAGE_P1),  # p1 @2
    (1, 3500, b"r5", feedback("r5", 1, label="resent")),  # p1 @3: supersedes @0
    (1, 4500, b"r7", feedback("r7", -1)),  # p1 @4
]


def result(request_id: str, version: str, total_ms: float) -> bytes:
    return CODEC.encode(
        "InferenceResult",
        {
            "request_id": request_id,
            "model": "smollm2",
            "model_version": version,
            "status": "OK",
            "text": f"answer {request_id}",
            "timings": {"queue_ms": 1.0, "total_ms": total_ms},
            "created_at": T0,
        },
    )


RESULTS = [
    (0, 0, b"q1", result("q1", "v1", 10.0)),
    (0, 100, b"q2", result("q2", "v2", 20.0)),
    (0, 200, b"q3", result("q3", "v2", 30.0)),
]


async def _create_and_produce(bootstrap: str, topic: str, partitions: int, items: list) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition, ts, key, value in items:
            await producer.send_and_wait(
                topic, value, key=key, partition=partition, timestamp_ms=T0 + ts
            )
    finally:
        await producer.stop()


async def _groups(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {group[0] for group in await admin.list_consumer_groups()}
    finally:
        await admin.close()


@pytest_asyncio.fixture(scope="module")
async def topics(kafka_bootstrap: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    names = {"feedback": f"t{tag}.feedback", "results": f"t{tag}.results"}
    await _create_and_produce(kafka_bootstrap, names["feedback"], 2, FEEDBACK)
    await _create_and_produce(kafka_bootstrap, names["results"], 1, RESULTS)
    return names


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _balanced(summary: ReplaySummary) -> bool:
    return summary.read == (
        summary.written
        + summary.undecodable
        + summary.tombstones
        + summary.skipped_filtered
        + summary.skipped_duplicates
    )


async def test_full_replay_jsonl_dedups_and_counts(
    kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path
) -> None:
    groups_before = await _groups(kafka_bootstrap)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "all.jsonl"
    summary = await replay(
        kafka_bootstrap, topics["feedback"], out, progress=lambda d, t: seen.append((d, t))
    )
    # r1@0 and r5@0 superseded, r4@5 deleted by its tombstone
    assert (summary.read, summary.undecodable, summary.skipped_duplicates) == (12, 2, 3)
    assert (summary.written, summary.skipped_filtered, summary.tombstones) == (6, 0, 1)
    assert _balanced(summary)
    assert summary.partitions == {0: (0, 7), 1: (0, 5)}
    assert (summary.first_timestamp_ms, summary.last_timestamp_ms) == (T0 + 1000, T0 + 4500)
    assert summary.fmt == "jsonl" and summary.out == out and summary.elapsed_s > 0
    assert seen[-1] == (12, 12)

    rows = _jsonl(out)
    assert [(r["_partition"], r["_offset"], r["request_id"]) for r in rows] == [
        (0, 1, "r2"),
        (0, 3, "r1"),
        (0, 4, "r3"),
        (1, 1, "r6"),
        (1, 3, "r5"),
        (1, 4, "r7"),
    ]
    r1 = next(r for r in rows if r["request_id"] == "r1")
    assert r1["score"] == -1 and r1["correction"] == "A better answer"  # the LAST one
    assert r1["_topic"] == topics["feedback"] and r1["_timestamp_ms"] == T0 + 3000
    assert r1["_schema"] == "FeedbackEvent"
    assert next(r for r in rows if r["request_id"] == "r5")["label"] == "resent"

    no_dedup = await replay(
        kafka_bootstrap, topics["feedback"], tmp_path / "raw.jsonl", dedup=False
    )
    assert (no_dedup.written, no_dedup.skipped_duplicates, no_dedup.tombstones) == (9, 0, 1)

    assert await _groups(kafka_bootstrap) == groups_before  # joined no consumer group
    # ...and the listing does show a group when a consumer joins one (the check can fail)
    control = f"control-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topics["feedback"], bootstrap_servers=kafka_bootstrap, group_id=control
    )
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=2000)
    finally:
        await consumer.stop()
    assert control in await _groups(kafka_bootstrap)
    assert sorted(os.listdir(tmp_path)) == ["all.jsonl", "raw.jsonl"]  # no temps


async def test_time_range_to_parquet(
    kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "window.parquet"
    summary = await replay(
        kafka_bootstrap, topics["feedback"], out, since_ms=T0 + 1000, until_ms=T0 + 4000
    )
    # p0: offsets 1..3 (ts 1000, 2000, 3000); p1: offsets 1..3 (ts 1500, 2500, 3500)
    assert summary.partitions == {0: (1, 4), 1: (1, 4)}
    assert (summary.read, summary.undecodable, summary.written) == (6, 2, 4)
    assert summary.skipped_duplicates == 0  # r1@0 and r5@0 lie before the window
    assert (summary.first_timestamp_ms, summary.last_timestamp_ms) == (T0 + 1000, T0 + 3500)
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [(r["_partition"], r["_offset"], r["request_id"], r["score"]) for r in rows] == [
        (0, 1, "r2", -1),
        (0, 3, "r1", -1),
        (1, 1, "r6", 0),
        (1, 3, "r5", 1),
    ]
    assert str(table.schema.field("created_at").type) == "timestamp[ms, tz=UTC]"
    assert rows[1]["correction"] == "A better answer" and rows[0]["correction"] is None

    # until before everything: nothing; since after everything: nothing
    empty = await replay(kafka_bootstrap, topics["feedback"], tmp_path / "e.jsonl", until_ms=T0)
    assert (empty.read, empty.written) == (0, 0)
    assert empty.partitions == {0: (0, 0), 1: (0, 0)}
    assert (tmp_path / "e.jsonl").read_text() == ""
    late = await replay(
        kafka_bootstrap, topics["feedback"], tmp_path / "late.jsonl", since_ms=T0 + 10_000
    )
    assert (late.read, late.written) == (0, 0)


async def test_offset_range_per_partition(
    kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "offsets.jsonl"
    summary = await replay(kafka_bootstrap, topics["feedback"], out, from_offset=1, to_offset=3)
    assert summary.partitions == {0: (1, 3), 1: (1, 3)}
    assert (summary.read, summary.undecodable, summary.written) == (4, 2, 2)
    assert [(r["_partition"], r["_offset"]) for r in _jsonl(out)] == [(0, 1), (1, 1)]
    beyond = await replay(
        kafka_bootstrap, topics["feedback"], tmp_path / "b.jsonl", from_offset=5, to_offset=100
    )
    assert beyond.partitions == {0: (5, 7), 1: (5, 5)}
    assert (beyond.read, beyond.tombstones, beyond.skipped_duplicates) == (2, 1, 1)
    assert _jsonl(tmp_path / "b.jsonl") == []  # r4 and the tombstone that deleted it


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ({"min_score": 1}, ["r5"]),  # r1's +1 was superseded by its -1; r4 was deleted
        ({"max_score": -1}, ["r2", "r1", "r7"]),
        ({"min_score": 0, "max_score": 0}, ["r3", "r6"]),
    ],
)
async def test_score_filters(
    kafka_bootstrap: str,
    topics: dict[str, str],
    tmp_path: Path,
    bounds: dict[str, int],
    expected: list[str],
) -> None:
    out = tmp_path / "scores.parquet"
    summary = await replay(kafka_bootstrap, topics["feedback"], out, **bounds)  # type: ignore[arg-type]
    assert [r["request_id"] for r in pq.read_table(out).to_pylist()] == expected
    assert summary.written == len(expected)
    assert summary.skipped_filtered == 6 - len(expected)
    assert _balanced(summary)


async def test_model_version_filter_and_flattening(
    kafka_bootstrap: str, topics: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "results.parquet"
    summary = await replay(kafka_bootstrap, topics["results"], out, model_version="v2")
    assert (summary.read, summary.written, summary.skipped_filtered) == (3, 2, 1)
    rows = pq.read_table(out).to_pylist()
    assert [(r["request_id"], r["timings_total_ms"]) for r in rows] == [("q2", 20.0), ("q3", 30.0)]
    assert rows[0]["status"] == "OK" and "timings" not in rows[0]
    jsonl = tmp_path / "results.jsonl"
    await replay(kafka_bootstrap, topics["results"], jsonl, model_version="v1")
    (only,) = _jsonl(jsonl)
    assert only["timings"]["total_ms"] == 10.0  # JSON keeps the nesting
    # feedback has no model_version: a filter on it matches nothing
    none = await replay(
        kafka_bootstrap, topics["feedback"], tmp_path / "none.jsonl", model_version="v2"
    )
    assert none.written == 0 and none.skipped_filtered == 6


async def test_terminates_while_producers_write(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"t{uuid.uuid4().hex[:8]}.busy"
    await _create_and_produce(
        kafka_bootstrap, topic, 1, [(0, i, b"k", feedback(f"b{i}", 1)) for i in range(20)]
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    await producer.start()
    stop = asyncio.Event()

    async def keep_writing() -> int:
        n = 0
        while not stop.is_set():
            await producer.send_and_wait(topic, feedback(f"late{n}", 0), key=b"late")
            n += 1
        return n

    writer = asyncio.create_task(keep_writing())
    try:
        await asyncio.sleep(0.3)
        summary = await asyncio.wait_for(
            replay(kafka_bootstrap, topic, tmp_path / "busy.jsonl", dedup=False), timeout=60
        )
    finally:
        stop.set()
        late = await writer
        await producer.stop()
    start, stop_offset = summary.partitions[0]
    assert start == 0 and 20 <= stop_offset <= 20 + late
    assert summary.read == summary.written == stop_offset  # exactly the window, then done


async def test_missing_topic_and_bad_arguments(kafka_bootstrap: str, tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="does not exist"):
        await replay(kafka_bootstrap, f"t{uuid.uuid4().hex}.nope", tmp_path / "x.jsonl")
    with pytest.raises(ReplayError, match="cannot tell the format"):
        await replay(kafka_bootstrap, "whatever", tmp_path / "x.csv")
    with pytest.raises(ReplayError, match="is after"):
        await replay(kafka_bootstrap, "whatever", tmp_path / "x.jsonl", since_ms=2, until_ms=1)
    assert os.listdir(tmp_path) == []
