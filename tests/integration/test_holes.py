"""Records the stream skipped are read from the broker and answered; nothing is committed
past them until they are.

The pipeline is fed by hand here, leaving out offsets as a misbehaving stream would: the
first delivered record comes after the group's committed offset, and a later one jumps
ahead. Everything else is real: broker, topics, Avro, the engine (the benchmark one),
the results on the broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from connectors.client import SluiceClient
from inference.backends.benchmark import BenchmarkEngine
from schemas.codec import AvroCodec
from streams.dedup import AnsweredIndex
from streams.holes import HoleReader
from streams.kafka_clients import stop_consumer
from streams.metrics import WorkerMetrics
from streams.pipeline import IntakePipeline
from streams.records import SourceRecord
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

N = 12
COMMITTED = 2
DELIVERED = [5, 6, 9, 10, 11]  # 2-4 skipped at the start, 7-8 skipped in the middle


class _Producer:
    """aiokafka's producer in the argument order the pipeline uses (Faust's)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer

    async def send(self, topic, key, value, partition, timestamp, headers) -> Any:  # type: ignore[no-untyped-def]
        return await self._producer.send(topic, value=value, key=key)


async def test_skipped_records_are_answered_before_the_mark_passes(settings_factory):
    settings = settings_factory(model_name="benchmark", commit_interval_ms=50, partitions=1)
    await ensure_topics(settings, settings.kafka_bootstrap)
    codec = AvroCodec.default()
    client = SluiceClient(settings)  # only to build records; never started
    requests = [
        client.build_request(f"prompt {i}", model="benchmark", max_new_tokens=4) for i in range(N)
    ]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    for record in requests:
        value = codec.encode("InferenceRequest", record)
        await producer.send_and_wait(
            settings.requests_topic, value, key=record["request_id"].encode(), partition=0
        )
    tp = TopicPartition(settings.requests_topic, 0)

    group = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.app_id,
        enable_auto_commit=False,
    )
    await group.start()
    try:
        group.assign([tp])
        await group.commit({tp: COMMITTED})
    finally:
        await stop_consumer(group)

    reader = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None)
    await reader.start()
    try:
        reader.assign([tp])
        reader.seek(tp, 0)
        messages = []
        while len(messages) < N:
            batch = await reader.getmany(tp, timeout_ms=1000)
            messages.extend(batch.get(tp, []))
    finally:
        await stop_consumer(reader)

    metrics = WorkerMetrics(CollectorRegistry())
    pipeline = IntakePipeline(
        settings,
        BenchmarkEngine(model_name="benchmark"),
        codec,
        metrics,
        AnsweredIndex(),
        holes=HoleReader(settings.kafka_bootstrap, settings.app_id),
    )
    commits: list[dict[Hashable, int]] = []
    calls = 0
    premature: list[tuple[int, list[int]]] = []

    async def committer(offsets: dict[Hashable, int]) -> bool:
        # Checked at commit time: every offset below the mark has its answer on the broker.
        mark = offsets[tp]
        missing = [
            o for o in range(COMMITTED, mark) if requests[o]["request_id"] not in pipeline.answered
        ]
        if missing:
            premature.append((mark, missing))
        nonlocal calls
        calls += 1
        if calls % 3 == 1:  # the broker refuses some commits: they must be made again later
            return False
        commits.append(dict(offsets))
        return True

    await pipeline.start(_Producer(producer), committer)
    try:
        for message in messages:
            if message.offset in DELIVERED:
                await pipeline.handle(
                    SourceRecord(
                        tp,
                        message.topic,
                        0,
                        message.offset,
                        message.key,
                        message.value,
                        message.timestamp,
                    )
                )
        results = await read_topic(
            settings,
            settings.results_topic,
            timeout=60,
            until=lambda rs: len({r["request_id"] for r in rs}) >= N - COMMITTED,
        )
        for _ in range(100):
            if commits and commits[-1].get(tp) == N:
                break
            await asyncio.sleep(0.1)
    finally:
        await pipeline.stop()
        await producer.stop()

    answered = {r["request_id"] for r in results}
    assert answered == {r["request_id"] for r in requests[COMMITTED:]}
    marks = [c[tp] for c in commits if tp in c]
    assert marks[-1] == N
    assert marks == sorted(marks)
    assert premature == [], f"committed past unanswered offsets: {premature}"
    assert metrics.skipped_records_total._value.get() == 5  # 2, 3, 4, 7, 8
