"""Builders for the records the worker writes: results and dead letters."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from inference.types import BatchOutcome


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """Where a record came from, and its raw bytes (what a dead letter carries)."""

    tp: Any  # hashable topic-partition of the consumer (faust TP)
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


def source_record(message: Any) -> SourceRecord:
    """A Faust message as a :class:`SourceRecord` (Faust timestamps are seconds)."""
    return SourceRecord(
        tp=message.tp,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=int((message.timestamp or 0) * 1000),
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def dead_letter(
    source: SourceRecord,
    reason_code: str,
    reason: str,
    *,
    request_id: str | None,
    worker: str,
    max_original_bytes: int | None = None,
) -> dict[str, Any]:
    """A ``DeadLetter`` for ``source``. Its copy of the original value is cut to
    ``max_original_bytes`` when longer (size and SHA-256 of the whole value are kept), so a
    dead letter always fits where the original barely did."""
    value = source.value
    record = {
        "reason_code": reason_code,
        "reason": reason,
        "source_topic": source.topic,
        "source_partition": source.partition,
        "source_offset": source.offset,
        "original_key": source.key,
        "original_value": value,
        "request_id": request_id,
        "worker": worker,
        "created_at": now_ms(),
        "original_size": len(value) if value is not None else None,
        "original_sha256": hashlib.sha256(value).hexdigest() if value is not None else None,
        "original_truncated": False,
    }
    if max_original_bytes is not None:
        record = truncate_original(record, max_original_bytes)
    return record


def truncate_original(record: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """``record`` (a DeadLetter) with at most ``max_bytes`` of the original value and key."""
    value, key = record.get("original_value"), record.get("original_key")
    if (value is None or len(value) <= max_bytes) and (key is None or len(key) <= max_bytes):
        return record
    shorter = dict(record)
    if value is not None and len(value) > max_bytes:
        shorter["original_value"] = value[:max_bytes]
        shorter["original_truncated"] = True
    if key is not None and len(key) > max_bytes:
        shorter["original_key"] = key[:max_bytes]
        shorter["original_truncated"] = True
    return shorter


def result_record(
    *,
    request_id: str,
    model: str,
    model_version: str,
    outcome: BatchOutcome | None,
    created_ms: int,
    read_ms: int,
    worker: str,
    expired: bool = False,
) -> dict[str, Any]:
    """An ``InferenceResult`` for a request that ran, failed or expired."""
    finished_ms = now_ms()
    record: dict[str, Any] = {
        "request_id": request_id,
        "model": model,
        "model_version": model_version,
        "status": "OK",
        "text": "",
        "finish_reason": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "timings": {
            "queue_ms": float(max(read_ms - created_ms, 0)),
            "batch_wait_ms": outcome.batch_wait_s * 1000.0 if outcome else 0.0,
            "inference_ms": outcome.inference_s * 1000.0 if outcome else 0.0,
            "total_ms": float(max(finished_ms - created_ms, 0)),
        },
        "batch_size": outcome.batch_size if outcome else 0,
        "worker": worker,
        "error": None,
        "created_at": finished_ms,
    }
    if expired or (outcome is not None and outcome.expired):
        record.update(status="EXPIRED", finish_reason="expired", error="deadline passed")
    elif outcome is not None and outcome.completion is not None:
        c = outcome.completion
        record.update(
            text=c.text,
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
        )
    else:
        error = outcome.error if outcome is not None else None
        record.update(status="ERROR", finish_reason="error", error=_describe(error))
    return record


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    return f"{type(error).__name__}: {error}"
