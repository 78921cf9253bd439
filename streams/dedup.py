"""Which request_ids were already answered: a bounded, insertion-ordered set."""

from __future__ import annotations

from collections import OrderedDict


class AnsweredIndex:
    """Remembers the last ``capacity`` answered request ids (oldest forgotten first)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, request_id: str) -> None:
        if self.capacity <= 0:
            return
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


async def load_answered(
    bootstrap: str,
    topic: str | list[str],
    capacity: int,
    client_options: dict | None = None,
    timeout: float = 60.0,
) -> AnsweredIndex:
    """Read the tail of the results topic (keys only) into an :class:`AnsweredIndex`.

    ``topic`` may be several topics (results and the requests DLQ: a dead-lettered request
    is answered too, and must not be answered again when it is read again).

    A restarted worker re-reads requests whose offsets were not committed before it died;
    this is how it knows which of them were already answered. Reads at most ``capacity``
    records, spread over the partitions, and never joins a consumer group.
    """
    import asyncio

    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka_clients import stop_consumer, topic_partitions

    index = AnsweredIndex(capacity)
    if capacity <= 0:
        return index
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        **(client_options or {}),
    )
    await consumer.start()
    try:
        topics = [topic] if isinstance(topic, str) else list(topic)
        tps = [
            TopicPartition(name, p)
            for name in topics
            for p in await topic_partitions(consumer, name)
        ]
        if not tps:
            return index
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        per_partition = max(capacity // len(tps), 1)
        remaining = {}
        for tp in tps:
            begin = max(starts[tp], ends[tp] - per_partition)
            if begin < ends[tp]:
                consumer.seek(tp, begin)
                remaining[tp] = ends[tp]
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout
        while remaining and loop.time() < give_up:
            batches = await consumer.getmany(*remaining.keys(), timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if record.key:
                        index.add(record.key.decode("utf-8", "replace"))
                if records and records[-1].offset + 1 >= remaining.get(tp, 0):
                    remaining.pop(tp, None)
        return index
    finally:
        await stop_consumer(consumer)
