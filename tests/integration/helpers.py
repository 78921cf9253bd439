"""Helpers for integration tests: worker processes and reading topics back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from connectors.processes import WORKER_READY, WorkerProcess, settings_env
from schemas.codec import AvroCodec
from streams.kafka_clients import stop_consumer, topic_partitions
from streams.settings import Settings


def start_worker(settings: Settings, log_dir: Path, name: str = "worker") -> WorkerProcess:
    worker = WorkerProcess(log_dir / f"{name}.log", env=settings_env(settings)).start()
    if not worker.wait_for_log(WORKER_READY, timeout=180):
        tail = worker.log_tail(40)
        worker.kill()
        raise AssertionError(f"worker did not become ready:\n{tail}")
    return worker


async def read_topic(
    settings: Settings,
    topic: str,
    *,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float,
    codec: AvroCodec | None = None,
) -> list[dict[str, Any]]:
    """Decode every record of ``topic`` from the beginning until ``until(records)`` holds
    or ``timeout`` passes. Records carry ``_partition``/``_offset``/``_key``."""
    codec = codec or AvroCodec.default()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        # aiokafka 0.14: with the default "latest" reset, a reset racing seek_to_beginning
        # after assign() can win, and nothing is read
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records: list[dict[str, Any]] = []
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        tps: list[TopicPartition] = []
        while not tps and loop.time() < give_up:
            tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
            if not tps:
                await asyncio.sleep(0.5)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while loop.time() < give_up and not until(records):
            batches = await consumer.getmany(timeout_ms=500)
            for tp, batch in batches.items():
                for message in batch:
                    _, value = codec.decode(message.value)
                    value.update(_partition=tp.partition, _offset=message.offset, _key=message.key)
                    records.append(value)
        return records
    finally:
        await stop_consumer(consumer)


async def produce_raw(settings: Settings, items: list[tuple[bytes | None, bytes | None]]) -> None:
    """Publish raw key/value pairs on the requests topic (for bad input)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(settings.requests_topic, value, key=key)
    finally:
        await producer.stop()


async def publish_records(
    settings: Settings, items: list[tuple[str, str, str, dict[str, Any]]]
) -> None:
    """Publish ``(topic, key, schema, record)`` items, Avro-encoded, one by one in order."""
    codec = AvroCodec.default()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for topic, key, schema, record in items:
            await producer.send_and_wait(topic, codec.encode(schema, record), key=key.encode())
    finally:
        await producer.stop()
