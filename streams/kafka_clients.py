"""Small helpers around aiokafka clients."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer. aiokafka 0.14's group-less coordinator raises CancelledError from
    ``stop()`` when its background task was cancelled before it first ran (a consumer
    assigned and stopped within one loop tick); yielding once lets the task start."""
    await asyncio.sleep(0)
    await consumer.stop()


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    """Partition ids of ``topic`` from fresh cluster metadata ([] if it does not exist).

    ``AIOKafkaConsumer.partitions_for_topic`` only knows topics already in the consumer's
    metadata; a group-less consumer that has not assigned anything yet knows none.
    """
    cluster = await consumer._client.fetch_all_metadata()  # aiokafka pinned: see pyproject
    return sorted(cluster.partitions_for_topic(topic) or ())
