"""The feedback join across a worker restart, on the real broker.

A worker joins some results, parks feedback for requests it never saw, and is stopped
(SIGTERM) with all of that pending. A new worker recovers the join table from its
changelog; once event time has passed the wait and the window, the parked feedback is
dead-lettered (with its own offset) and the recovered entries expire: first to a marker
without the prompt, then to a tombstone on the changelog.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from connectors.client import SluiceClient
from schemas.codec import AvroCodec
from streams.feedback_join import changelog_topic
from streams.kafka_clients import stop_consumer, topic_partitions
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = [pytest.mark.integration]

WINDOW_MS, WAIT_MS = 10_000, 4_000
PARTITIONS = 4
FEEDBACK_PER_GHOST = 3  # offsets 0, 1, 2 on its partition: each letter must name its own


def _partition(key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


def _ids_on_every_partition(prefix: str) -> list[str]:
    ids: dict[int, str] = {}
    i = 0
    while len(ids) < PARTITIONS:
        ids.setdefault(_partition(f"{prefix}-{i}"), f"{prefix}-{i}")
        i += 1
    return list(ids.values())


async def _changelog(settings: Settings, timeout: float, until: Any) -> dict[str, Any]:
    """The latest value per key of the join table's changelog (None: a tombstone), read
    again until ``until(latest)`` holds or ``timeout`` passes."""
    topic = changelog_topic(settings)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    latest: dict[str, Any] = {}
    while True:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
            if tps:
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                ends = await consumer.end_offsets(tps)
                while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                    for batch in (await consumer.getmany(timeout_ms=500)).values():
                        for message in batch:
                            key = json.loads(message.key)
                            value = None if message.value is None else json.loads(message.value)
                            latest[key] = value
                    if loop.time() > give_up:
                        break
        finally:
            await stop_consumer(consumer)
        if until(latest) or loop.time() > give_up:
            return latest
        await asyncio.sleep(1.0)


async def _publish(client: SluiceClient, ids: list[str]) -> None:
    for rid in ids:
        await client.publish_record(
            client.build_request(f"Say a word ({rid}).", request_id=rid, max_new_tokens=2)
        )


async def test_pending_entries_expire_and_parked_feedback_is_dead_lettered_after_a_restart(
    settings_factory, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    settings = settings_factory(
        backend="benchmark",
        feedback_join=True,
        feedback_window_ms=WINDOW_MS,
        feedback_wait_ms=WAIT_MS,
        partitions=PARTITIONS,
        feedback_dlq_topic=f"t{tag}.feedback.dlq",
        dedup_capacity=1_000,
    )
    await ensure_topics(settings, settings.kafka_bootstrap)
    answered = _ids_on_every_partition(f"req-{tag}")
    ghosts = _ids_on_every_partition(f"ghost-{tag}")[:2]
    codec = AvroCodec.default()
    started = time.monotonic()

    worker = start_worker(settings, tmp_path, "first")
    try:
        async with SluiceClient(settings) as client:
            await _publish(client, answered)
            results = await asyncio.gather(*(client.result(r, timeout=60) for r in answered))
            assert all(r["status"] == "OK" for r in results)
            await client.send_feedback(answered[0], 1, correction="A word.")
            for rid in ghosts:  # feedback for requests nobody made: parked
                for n in range(FEEDBACK_PER_GHOST):
                    await client.send_feedback(rid, -1, label=f"try {n}")
        examples = await read_topic(
            settings, settings.training_topic, timeout=30, until=lambda rs: len(rs) >= 1
        )
        assert [e["request_id"] for e in examples] == [answered[0]]
        before = await _changelog(
            settings,
            timeout=30,
            until=lambda t: (
                all("pending" in (t.get(g) or {}) for g in ghosts)
                and all("result" in (t.get(r) or {}) for r in answered)
            ),
        )
        assert all("pending" in (before.get(g) or {}) for g in ghosts), before
        assert all("result" in (before.get(r) or {}) for r in answered), before
        last_record_ms = max(
            [int(before[g]["seen_ms"]) for g in ghosts]
            + [int(before[r]["seen_ms"]) for r in answered]
        )
    finally:
        assert worker.stop(timeout=45) is not None
    letters_before = await read_topic(
        settings, settings.feedback_dlq_topic, timeout=3, until=lambda rs: False
    )
    assert letters_before == [], "nothing was due before the restart"

    worker = start_worker(settings, tmp_path, "second")
    try:
        async with SluiceClient(settings) as client:
            # Event time moves only with records: once the window is over on the wall
            # clock, a request on every partition moves each partition's clock past it.
            await _sleep_until_ms(last_record_ms + WINDOW_MS + 500)
            await _publish(client, _ids_on_every_partition(f"tick-{tag}"))

            letters = await read_topic(
                settings,
                settings.feedback_dlq_topic,
                timeout=30,
                until=lambda rs: len(rs) >= len(ghosts) * FEEDBACK_PER_GHOST,
            )
            feedback = await read_topic(
                settings,
                settings.feedback_topic,
                timeout=10,
                until=lambda rs: len(rs) >= len(ghosts) * FEEDBACK_PER_GHOST + 1,
            )
            sent = sorted(
                (f["request_id"], "unknown_request", f["_partition"], f["_offset"], f["label"])
                for f in feedback
                if f["request_id"] in ghosts
            )
            got = []
            for d in letters:
                _, original = codec.decode(d["original_value"], expected="FeedbackEvent")
                got.append(
                    (
                        d["request_id"],
                        d["reason_code"],
                        d["source_partition"],
                        d["source_offset"],
                        original["label"],
                    )
                )
            assert sorted(got) == sent
            assert all(d["source_topic"] == settings.feedback_topic for d in letters)

            expired = await _changelog(
                settings,
                timeout=30,
                until=lambda t: all("expired_ms" in (t.get(r) or {}) for r in answered),
            )
            for rid in answered:
                assert set(expired[rid] or {}) == {"partition", "seen_ms", "expired_ms"}, (
                    "the prompt and the answer left the changelog"
                )

            # Another window later the markers go too: tombstones on the changelog.
            await _sleep_until_ms(
                max(int(expired[r]["expired_ms"]) for r in answered) + WINDOW_MS + 500
            )
            await _publish(client, _ids_on_every_partition(f"tock-{tag}"))
            gone = await _changelog(
                settings,
                timeout=30,
                until=lambda t: all(r in t and t[r] is None for r in [*answered, *ghosts]),
            )
            assert all(gone.get(r, "missing") is None for r in [*answered, *ghosts]), gone
    finally:
        worker.stop(timeout=45)
    print(f"restart scenario took {time.monotonic() - started:.0f}s")


async def _sleep_until_ms(deadline_ms: int) -> None:
    delay = deadline_ms / 1000 - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
