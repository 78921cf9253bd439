"""Every worker reads ``llm.control`` in full, without a consumer group.

A consumer group would split the topic between workers; rollout commands must reach all of
them. At start a worker replays the topic to its end (so it serves what operators last
asked for before it takes any request), then follows it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import AvroCodec
from schemas.errors import SchemaError
from streams.kafka_clients import stop_consumer, topic_partitions

logger = logging.getLogger(__name__)

Apply = Callable[[dict[str, Any]], Awaitable[None]]


class ControlListener:
    """Applies each ``ControlCommand`` of the control topic, in order, exactly once each."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        codec: AvroCodec,
        apply: Apply,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._codec = codec
        self._apply = apply
        self._options = client_options or {}
        self._consumer: AIOKafkaConsumer | None = None
        self.applied = 0

    async def catch_up(self, timeout: float = 60.0) -> int:
        """Apply every command already on the topic. Returns how many."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            **self._options,
        )
        await consumer.start()
        self._consumer = consumer
        tps = [
            TopicPartition(self._topic, p) for p in await topic_partitions(consumer, self._topic)
        ]
        if not tps:
            logger.warning("control topic %s does not exist; no rollout commands", self._topic)
            return 0
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while loop.time() < give_up:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                break
            await self._poll(consumer, 500)
        return self.applied

    async def run(self) -> None:
        """Follow the topic until cancelled."""
        if self._consumer is None:
            await self.catch_up()
        assert self._consumer is not None
        while True:
            await self._poll(self._consumer, 1000)

    async def _poll(self, consumer: AIOKafkaConsumer, timeout_ms: int) -> None:
        batches = await consumer.getmany(timeout_ms=timeout_ms)
        for records in batches.values():
            for record in records:
                try:
                    _, command = self._codec.decode(record.value, expected="ControlCommand")
                except SchemaError as exc:
                    logger.warning(
                        "skipping undecodable control record @%d: %s", record.offset, exc
                    )
                    continue
                logger.info("control: %s %s", command["command"], command)
                await self._apply(command)
                self.applied += 1

    async def stop(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None
