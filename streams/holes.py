"""Reading what the stream did not deliver, straight from the broker.

The intake trusts Faust to deliver every record of its partitions in order, but checks it:
a partition's first record should be the group's committed offset, and each next record the
offset after the last (:mod:`streams.watermarks` calls a skipped range a *hole*). When the
stream skips records (a seek racing the fetcher at a rebalance is the classic way, see
"Faust loss modes" in docs/delivery.md), :class:`HoleReader` reads the hole with a
group-less consumer so the pipeline can answer its records. A hole that held only
transaction markers reads empty: the reader stops when the broker moved its position to
the end of the range.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka_clients import stop_consumer
from streams.log_limits import RateLimitedLogger
from streams.records import SourceRecord

logger = logging.getLogger(__name__)


class HoleReader:
    """The group's committed offsets, and records of an offset range, from the broker."""

    def __init__(
        self,
        bootstrap: str,
        group_id: str,
        client_options: dict[str, Any] | None = None,
        *,
        read_timeout: float = 30.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._group_id = group_id
        self._options = client_options or {}
        self._read_timeout = read_timeout
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._log = RateLimitedLogger(logger, interval_s=10.0)

    async def committed(self, tp: Hashable) -> int | None:
        """The group's committed offset of ``tp`` (None when it has none)."""
        async with self._lock:
            if self._admin is None:
                admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, **self._options)
                await admin.start()
                self._admin = admin
            partition = _aiokafka_tp(tp)
            offsets = await self._admin.list_consumer_group_offsets(
                self._group_id, partitions=[partition]
            )
        meta = offsets.get(partition)
        if meta is None or meta.offset < 0:
            return None
        return int(meta.offset)

    async def read_chunks(
        self, tp: Hashable, start: int, end: int, *, max_records: int = 500
    ) -> AsyncIterator[list[SourceRecord]]:
        """The records of ``tp`` with ``start <= offset < end``, in offset order, a chunk at
        a time. Ends when the consumer's position reaches ``end``: the broker's own account
        of the range (control records such as transaction markers are never returned, but
        the position moves past them), not a timer. A failed fetch is retried with backoff
        from where it stopped; the caller decides how long to wait (cancel the iteration)."""
        partition = _aiokafka_tp(tp)
        position = start
        delay = 0.2
        while position < end:
            try:
                chunk, position = await self._fetch(tp, partition, position, end, max_records)
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.warning(
                    f"hole:{partition}",
                    "reading %s [%d, %d) failed at %d (%r); retrying",
                    partition,
                    start,
                    end,
                    position,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if chunk:
                yield chunk

    async def _fetch(
        self, tp: Hashable, partition: TopicPartition, position: int, end: int, max_records: int
    ) -> tuple[list[SourceRecord], int]:
        async with self._lock:
            consumer = await self._reader()
            consumer.assign([partition])
            consumer.seek(partition, position)
            batches = await consumer.getmany(partition, timeout_ms=500, max_records=max_records)
            new_position = await consumer.position(partition)
        records = [
            SourceRecord(
                tp=tp,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                key=message.key,
                value=message.value,
                timestamp_ms=int(message.timestamp or 0),
            )
            for message in batches.get(partition, [])
            if message.offset < end
        ]
        # Records gone by retention: the reader starts at the earliest one it has.
        return records, max(new_position, position)

    async def _reader(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self._bootstrap,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",  # records gone by retention: read the rest
                **self._options,
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def read(self, tp: Hashable, start: int, end: int) -> list[SourceRecord]:
        """Every record of ``tp`` with ``start <= offset < end``. Raises ``TimeoutError``
        when the range cannot be read within the read timeout."""

        async def collect() -> list[SourceRecord]:
            return [r async for chunk in self.read_chunks(tp, start, end) for r in chunk]

        return await asyncio.wait_for(collect(), self._read_timeout)

    async def close(self) -> None:
        async with self._lock:
            if self._consumer is not None:
                await stop_consumer(self._consumer)
                self._consumer = None
            if self._admin is not None:
                await self._admin.close()
                self._admin = None


def _aiokafka_tp(tp: Hashable) -> TopicPartition:
    topic, partition = tp  # type: ignore[misc]  # Faust's TP and aiokafka's are (topic, partition)
    return TopicPartition(topic, partition)
