"""``sluice tail TOPIC``: print decoded records of any Sluice topic, the DLQ included."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import AvroCodec
from schemas.errors import SchemaError
from streams.kafka_clients import stop_consumer, topic_partitions


def describe_value(codec: AvroCodec, value: bytes | None) -> dict[str, Any]:
    """A JSON-friendly view of a record value: decoded if we can, else why not."""
    try:
        name, record = codec.decode(value)
    except SchemaError as exc:
        return {"_undecodable": str(exc), "_bytes": _preview(value)}
    return {"_schema": name, **{k: _jsonable(v) for k, v in record.items()}}


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return _preview(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _preview(value: bytes | None, limit: int = 96) -> str | None:
    if value is None:
        return None
    try:
        text = value.decode("utf-8")
        if text.isprintable():
            return text if len(text) <= limit else text[:limit] + "…"
    except UnicodeDecodeError:
        pass
    encoded = base64.b64encode(value[:limit]).decode()
    return f"base64:{encoded}" + ("…" if len(value) > limit else "")


async def tail(
    bootstrap: str,
    topic: str,
    codec: AvroCodec,
    emit: Callable[[dict[str, Any]], None],
    *,
    from_beginning: bool = False,
    limit: int | None = None,
    follow: bool = True,
    idle_exit_s: float = 2.0,
    client_options: dict[str, Any] | None = None,
) -> int:
    """Print records of ``topic``; returns how many. Never joins a consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        **(client_options or {}),
    )
    await consumer.start()
    count = 0
    try:
        parts = await topic_partitions(consumer, topic)
        if not parts:
            raise SystemExit(f"topic {topic!r} does not exist")
        tps = [TopicPartition(topic, p) for p in parts]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        idle_since = asyncio.get_running_loop().time()
        while limit is None or count < limit:
            batches = await consumer.getmany(timeout_ms=250)
            now = asyncio.get_running_loop().time()
            if not batches:
                if not follow and now - idle_since > idle_exit_s:
                    break
                continue
            idle_since = now
            for tp, records in batches.items():
                for record in records:
                    emit(
                        {
                            "partition": tp.partition,
                            "offset": record.offset,
                            "key": _preview(record.key),
                            "value": describe_value(codec, record.value),
                        }
                    )
                    count += 1
                    if limit is not None and count >= limit:
                        return count
        return count
    finally:
        await stop_consumer(consumer)


def format_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, default=str)
