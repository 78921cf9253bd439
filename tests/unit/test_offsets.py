"""The offset keeper and the pipeline's intake with fakes: revocation races, commits only
for owned partitions, holes read in chunks and closed by the reader's position."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from typing import Any

from prometheus_client import CollectorRegistry

from inference.backends.benchmark import BenchmarkEngine
from schemas.codec import AvroCodec
from streams.dedup import AnsweredIndex
from streams.metrics import WorkerMetrics
from streams.offsets import OffsetKeeper
from streams.pipeline import IntakePipeline
from streams.records import SourceRecord
from streams.settings import Settings

TP = ("requests", 0)


class HeldProducer:
    """Accepts sends; the broker acknowledges only when the test says so."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []
        self.pending: list[asyncio.Future[Any]] = []

    async def send(self, topic, key, value, partition, timestamp, headers):  # type: ignore[no-untyped-def]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, key))
        self.pending.append(future)
        return future

    def ack_all(self) -> None:
        for future in self.pending:
            if not future.done():
                future.set_result(None)
        self.pending = []


def _record(codec: AvroCodec, offset: int, tp: Any = TP) -> SourceRecord:
    request = {
        "request_id": f"r{tp[1]}-{offset}",
        "model": "benchmark",
        "prompt": f"prompt {offset}",
        "sampling": {
            "max_new_tokens": 4,
            "temperature": 0.0,
            "top_p": 1.0,
            "stop": [],
            "seed": None,
        },
        "created_at": 0,
    }
    value = codec.encode("InferenceRequest", request)
    return SourceRecord(tp, tp[0], tp[1], offset, request["request_id"].encode(), value, 0)


def _pipeline(tmp_path: Any, **overrides: Any) -> IntakePipeline:
    settings = Settings(
        home=tmp_path, model_name="benchmark", commit_interval_ms=10_000, **overrides
    )
    return IntakePipeline(
        settings,
        BenchmarkEngine(model_name="benchmark"),
        AvroCodec.default(),
        WorkerMetrics(CollectorRegistry()),
        AnsweredIndex(),
    )


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


async def test_a_record_blocked_across_a_revocation_is_dropped_untracked(tmp_path) -> None:
    pipeline = _pipeline(tmp_path, max_inflight=1, batch_max_wait_ms=0)
    codec = pipeline.codec
    assigned = {TP}
    commits: list[dict[Hashable, int]] = []

    async def committer(offsets: dict[Hashable, int]) -> bool:
        commits.append(dict(offsets))
        return True

    producer = HeldProducer()
    await pipeline.start(producer, committer, assigned=lambda: set(assigned))
    try:
        await pipeline.handle(_record(codec, 0))  # takes the only slot
        blocked = asyncio.create_task(pipeline.handle(_record(codec, 1)))
        await _settle()
        assert not blocked.done()
        assigned.clear()
        await pipeline.on_partitions_revoked({TP})
        producer.ack_all()  # offset 0 answered: its slot frees, offset 1 wakes up
        await _settle()
        await asyncio.wait_for(blocked, 1)
        assert not pipeline.offsets.knows(TP), "state rebuilt for a revoked partition"
        assert pipeline.watermarks.in_flight() == 0
        # The partition comes back with the group's offset far ahead: no hole, no commit
        # below it.
        assigned.add(TP)
        pipeline.offsets.watermarks.start(TP, 500)
        await pipeline.handle(_record(codec, 40))
        await _settle()
        producer.ack_all()
        await _settle()
        assert pipeline.watermarks.holes(TP) == []
        await pipeline.commit_now()
        assert all(c.get(TP, 500) >= 500 for c in commits), commits
    finally:
        producer.ack_all()
        await pipeline.stop(grace_s=1)


async def test_commits_only_for_assigned_partitions(tmp_path) -> None:
    other = ("requests", 1)
    keeper = OffsetKeeper()
    handed: list[dict[Hashable, int]] = []

    async def committer(offsets: dict[Hashable, int]) -> bool:
        handed.append(dict(offsets))
        return True

    owned = {TP}
    keeper.bind(committer, assigned=lambda: set(owned))
    codec = AvroCodec.default()
    for tp in (TP, other):
        record = _record(codec, 0, tp)
        keeper.track(record)
        keeper.finish(record)
    assert await keeper.commit_now() == {TP: 1}
    assert handed == [{TP: 1}]
    owned.add(other)
    assert await keeper.commit_now() == {other: 1}  # never recorded as committed before


class ChunkedHoles:
    """A hole source that returns the range in chunks of two, then stops."""

    def __init__(self, records: list[SourceRecord]) -> None:
        self.records = records
        self.closed_early = False

    async def committed(self, tp: Hashable) -> int | None:
        return 0

    async def read_chunks(self, tp: Hashable, start: int, end: int) -> AsyncIterator[list]:
        wanted = [r for r in self.records if start <= r.offset < end]
        for i in range(0, len(wanted), 2):
            await asyncio.sleep(0)
            yield wanted[i : i + 2]

    async def close(self) -> None:
        return None


async def test_a_hole_shrinks_as_its_records_are_answered(tmp_path) -> None:
    codec = AvroCodec.default()
    records = [_record(codec, i) for i in range(10)]
    seen: list[int] = []
    holes = ChunkedHoles(records)
    keeper = OffsetKeeper(holes=holes)
    marks_during: list[int | None] = []

    async def answer(record: SourceRecord) -> None:
        keeper.track(record)
        seen.append(record.offset)
        marks_during.append(keeper.watermarks.committable().get(TP))
        keeper.finish(record)

    async def committer(offsets: dict[Hashable, int]) -> bool:
        return True

    keeper.bind(committer, answer=answer)
    keeper.watermarks.start(TP, 0)
    keeper.track(records[7])  # offsets 0-6 were skipped by the stream
    keeper.finish(records[7])
    assert keeper.watermarks.holes(TP) == [(0, 7)]
    for _ in range(50):
        await asyncio.sleep(0)
    assert seen == [0, 1, 2, 3, 4, 5, 6]
    assert keeper.watermarks.holes(TP) == []
    assert keeper.watermarks.committable() == {TP: 8}
    # While the hole was being read, the mark never passed an offset not yet read.
    assert all(m is None or m <= o for m, o in zip(marks_during, seen, strict=True))
