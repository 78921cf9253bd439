"""Small helpers around aiokafka clients."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

logger = logging.getLogger(__name__)


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


class OutboxProducer:
    """The producer of results and dead letters: idempotent (a retried send is never
    written twice by the broker), ``acks=all``, the settings' security options, and a
    stop that is bounded in time (a broker that is gone cannot hold a shutdown).

    ``send`` has Faust's argument order, so the outbox works with either producer."""

    def __init__(
        self,
        bootstrap: str,
        client_options: dict[str, Any] | None = None,
        *,
        max_request_size: int = 1_048_576,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._options = client_options or {}
        self._max_request_size = max_request_size
        self._stop_timeout_s = stop_timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_request_size=self._max_request_size,
            **self._options,
        )
        await producer.start()
        self._producer = producer

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]:
        assert self._producer is not None, "start() first"
        return await self._producer.send(topic, value=value, key=key, partition=partition)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await asyncio.wait_for(producer.stop(), self._stop_timeout_s)
        except (TimeoutError, Exception) as exc:
            logger.warning(
                "producer did not stop cleanly within %.0f s: %r", self._stop_timeout_s, exc
            )


async def group_state(admin: Any, group_id: str) -> tuple[str, int] | None:
    """(state, member count) of consumer group ``group_id`` from ``admin`` (a started
    ``AIOKafkaAdminClient``); None when the broker does not know the group."""
    for response in await admin.describe_consumer_groups([group_id]):
        for info in response.groups:
            # (error_code, group_id, state, protocol_type, protocol, members, ...)
            if info[1] == group_id and info[2] != "Dead":
                return str(info[2]), len(info[5])
    return None
