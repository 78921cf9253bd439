"""Reading what the stream did not deliver, straight from the broker.

The intake trusts Faust to deliver every record of its partitions in order, but checks it:
a partition's first record should be the group's committed offset, and each next record the
offset after the last (:mod:`streams.watermarks` calls a skipped range a *hole*). When the
stream skips records (a seek racing the fetcher at a rebalance is the classic way, see
FAUST_NOTES #3), :class:`HoleReader` reads the hole with a group-less consumer so the
pipeline can answer its records. A hole that held only transaction markers reads empty.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka_clients import stop_consumer
from streams.records import SourceRecord

logger = logging.getLogger(__name__)

_STALL_S = 10.0  # no progress this long with data past the range: only markers are left


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

    async def read(self, tp: Hashable, start: int, end: int) -> list[SourceRecord]:
        """Every record of ``tp`` with ``start <= offset < end``. Raises ``TimeoutError``
        when the range cannot be read within the read timeout."""
        partition = _aiokafka_tp(tp)
        async with self._lock:
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
            consumer = self._consumer
            consumer.assign([partition])
            consumer.seek(partition, start)
            records: list[SourceRecord] = []
            loop = asyncio.get_running_loop()
            give_up = loop.time() + self._read_timeout
            position = await consumer.position(partition)
            progress_at = loop.time()
            while position < end:
                now = loop.time()
                if now > give_up:
                    raise TimeoutError(
                        f"reading {partition.topic}/{partition.partition} [{start}, {end}) "
                        f"took over {self._read_timeout:.0f} s"
                    )
                highwater = consumer.highwater(partition)
                if now - progress_at > _STALL_S and highwater is not None and highwater >= end:
                    # Data up to ``end`` exists, yet nothing more comes: the rest of the range
                    # is control records (transaction markers), which are never returned.
                    break
                batches = await consumer.getmany(partition, timeout_ms=500)
                new_position = await consumer.position(partition)
                if new_position != position:
                    position, progress_at = new_position, loop.time()
                for message in batches.get(partition, []):
                    if start <= message.offset < end:
                        records.append(
                            SourceRecord(
                                tp=tp,
                                topic=message.topic,
                                partition=message.partition,
                                offset=message.offset,
                                key=message.key,
                                value=message.value,
                                timestamp_ms=int(message.timestamp or 0),
                            )
                        )
            return records

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
