"""``sluice tail TOPIC``: print decoded records of any Sluice topic, the DLQ included.

Records are printed as one JSON object per line, except ``MetricsWindow`` records (on
``llm.metrics``), which get one readable line per window (:func:`format_window`). A
``ControlCommand``'s ``evidence`` (the JSON an automatic canary decision rests on) is shown
as JSON inside the line, not as an escaped string.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import AvroCodec
from schemas.errors import RegistryError, SchemaError
from streams.kafka_clients import stop_consumer, topic_partitions


def describe_value(codec: AvroCodec, value: bytes | None) -> dict[str, Any]:
    """A JSON-friendly view of a record value: decoded if we can, else why not."""
    try:
        name, record = codec.decode(value)
    except (SchemaError, RegistryError) as exc:
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
        # the reset that assign() starts must agree with the seek below: with "latest", it
        # can win over seek_to_beginning() and -b prints nothing (aiokafka 0.14)
        auto_offset_reset="earliest" if from_beginning else "latest",
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
    """One line for a tailed record: a readable summary for a ``MetricsWindow``, else JSON."""
    value = entry.get("value")
    if isinstance(value, dict) and value.get("_schema") == "MetricsWindow":
        return format_window(value)
    if isinstance(value, dict) and isinstance(value.get("evidence"), str):
        try:
            entry = {**entry, "value": {**value, "evidence": json.loads(value["evidence"])}}
        except ValueError:
            pass  # not JSON: shown as the string it is
    return json.dumps(entry, ensure_ascii=False, default=str)


def format_window(window: dict[str, Any]) -> str:
    """One line per window, e.g.
    ``2026-12-01T10:00:00Z 10s smollm2/v1 req 12 (OK 11 ERROR 1) dlq 0 p50 812ms p99 2.1s
    tok/s 38.4 batch 3.2/8 feedback 2 (+0.50)``."""
    start = datetime.fromtimestamp(window.get("window_start", 0) / 1000, tz=UTC)
    model = window.get("model") or "(no model)"
    version = window.get("model_version") or "-"
    parts = [
        start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        f"{window.get('length_s', 0)}s",
        f"{model}/{version}",
    ]
    if window.get("tenant"):
        parts.append(f"tenant {window['tenant']}")
    if window.get("correction"):
        parts.append(f"CORRECTION +{window.get('late_records', 0)} late")
    requests = window.get("requests") or {}
    by_status = " ".join(f"{k} {v}" for k, v in sorted(requests.items()))
    parts.append(
        f"req {window.get('requests_total', 0)}" + (f" ({by_status})" if by_status else "")
    )
    dead = window.get("dead_letters") or {}
    by_reason = " ".join(f"{k} {v}" for k, v in sorted(dead.items()))
    parts.append(
        f"dlq {window.get('dead_letters_total', 0)}" + (f" ({by_reason})" if by_reason else "")
    )
    total = (window.get("latency") or {}).get("total") or {}
    parts.append(f"p50 {_ms(total.get('p50_ms'))} p99 {_ms(total.get('p99_ms'))}")
    parts.append(f"tok/s {window.get('tokens_per_s', 0.0):.1f}")
    mean = window.get("batch_size_mean")
    if mean is not None:
        parts.append(f"batch {mean:.1f}/{window.get('batch_size_max', 0)}")
    score = window.get("feedback_mean_score")
    feedback = f"feedback {window.get('feedback_count', 0)}"
    parts.append(feedback + (f" ({score:+.2f})" if score is not None else ""))
    return " ".join(parts)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f}s"
    return f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"
