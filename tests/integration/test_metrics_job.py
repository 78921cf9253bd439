"""The metrics job on the real broker: synthetic results, dead letters and feedback (real
codec) in, MetricsWindow records out, with correct counts, a restart in the middle that
neither drops nor double-counts, and a late record that comes back as a correction."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from connectors.tail import format_line, tail
from schemas.codec import AvroCodec
from streams.app import faust_app
from streams.metrics import WorkerMetrics
from streams.metrics_windows.job import add_metrics_job, decode_state, read_latest, state_topic
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import publish_records, read_topic

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _result(rid: str, t: int, status: str = "OK", total: float = 50.0) -> dict[str, Any]:
    return {
        "request_id": rid,
        "model": "m",
        "model_version": "v1",
        "status": status,
        "text": "hi",
        "prompt_tokens": 5,
        "completion_tokens": 8,
        "timings": {
            "queue_ms": 1.0,
            "batch_wait_ms": 2.0,
            "inference_ms": total - 3.0,
            "total_ms": total,
        },
        "batch_size": 2,
        "worker": "w",
        "created_at": t,
    }


async def _start_job(settings: Settings) -> Any:
    assert settings.kafka_bootstrap
    app = faust_app(settings, settings.kafka_bootstrap, web_port=_free_port())
    add_metrics_job(app, settings, AvroCodec.default(), WorkerMetrics(CollectorRegistry()))
    await app.start()
    return app


async def _persisted_records(settings: Settings) -> int:
    """How many input records the persisted state has counted (its positions)."""
    assert settings.kafka_bootstrap
    data = await read_latest(
        settings.kafka_bootstrap, state_topic(settings), settings.app_id.encode(), {}
    )
    if data is None:
        return 0
    return sum(offset for _, _, offset in decode_state(data)["positions"])


async def _wait_persisted(settings: Settings, n: int, timeout: float = 30) -> None:
    give_up = time.monotonic() + timeout
    while (seen := await _persisted_records(settings)) < n:
        assert time.monotonic() < give_up, f"state counts {seen} of {n} records"
        await asyncio.sleep(0.5)


async def test_windows_counted_once_across_a_restart_and_late_records_corrected(
    settings_factory: Any,
) -> None:
    settings = settings_factory(
        metrics_window_s=10,
        metrics_rollup_s=60,
        metrics_lateness_s=1,
        metrics_snapshot_interval_ms=200,
        worker_id="metrics-test",
    )
    assert settings.kafka_bootstrap
    await ensure_topics(settings, settings.kafka_bootstrap)
    base = (int(time.time() * 1000) // 60_000 - 5) * 60_000  # a minute boundary, 5 min ago

    statuses = ["OK"] * 6 + ["ERROR"] * 2
    first = [
        (
            settings.results_topic,
            f"r{i}",
            "InferenceResult",
            _result(f"r{i}", base + 1000 + i * 500, s),
        )
        for i, s in enumerate(statuses)
    ]
    first += [
        (
            settings.dlq_topic,
            f"d{i}",
            "DeadLetter",
            {
                "reason_code": reason,
                "reason": "test",
                "source_topic": settings.requests_topic,
                "source_partition": 0,
                "source_offset": i,
                "created_at": base + 2000,
            },
        )
        for i, reason in enumerate(["bad_sampling", "bad_sampling", "undecodable"])
    ]
    first += [
        (
            settings.feedback_topic,
            rid,
            "FeedbackEvent",
            {"request_id": rid, "score": score, "created_at": base + 7000},
        )
        for rid, score in (("r0", 1), ("r1", 1), ("r2", -1))
    ]
    app = await _start_job(settings)
    try:
        await publish_records(settings, first[:8])  # the results
        await _wait_persisted(settings, 8)
    finally:
        await app.stop()  # a restart between the results and the rest
    app = await _start_job(settings)
    try:
        await publish_records(settings, first[8:])
        await _wait_persisted(settings, len(first))
        # one record far ahead moves the watermark past the first minute
        await publish_records(
            settings,
            [(settings.results_topic, "push", "InferenceResult", _result("push", base + 70_000))],
        )
        windows = await read_topic(
            settings,
            settings.metrics_topic,
            until=lambda rs: any(r["length_s"] == 60 for r in rs),
            timeout=30,
        )
        # a record for the closed first window, then another push to close its correction
        await publish_records(
            settings,
            [
                (settings.results_topic, "late", "InferenceResult", _result("late", base + 3000)),
                (
                    settings.results_topic,
                    "push2",
                    "InferenceResult",
                    _result("push2", base + 95_000),
                ),
            ],
        )
        windows = await read_topic(
            settings,
            settings.metrics_topic,
            until=lambda rs: sum(r["correction"] for r in rs) >= 2,  # 10 s and 60 s
            timeout=30,
        )
    finally:
        await app.stop()

    by_id: dict[str, dict[str, Any]] = {}
    for window in windows:  # a window published twice has the same id: keep one
        by_id.setdefault(window["window_id"], window)
    first_window = by_id[f"10s:{base}:m:v1:"]
    assert first_window["requests"] == {"OK": 6, "ERROR": 2}
    assert first_window["feedback_count"] == 3 and first_window["feedback_score_sum"] == 1
    assert first_window["latency"]["total"]["p50_ms"] == pytest.approx(50.0, rel=0.01)
    assert first_window["completion_tokens"] == 64 and first_window["tokens_per_s"] == 6.4
    assert first_window["_key"] == b"m"
    dead = by_id[f"10s:{base}:::"]
    assert dead["dead_letters"] == {"bad_sampling": 2, "undecodable": 1}
    rollup = by_id[f"60s:{base}:m:v1:"]
    assert rollup["requests_total"] == 8 and rollup["correction"] is False
    corrections = [w for w in by_id.values() if w["correction"]]
    assert {w["window_start"] for w in corrections} == {base}
    assert {w["length_s"] for w in corrections} == {10, 60}
    assert all(w["requests"] == {"OK": 1} and w["late_records"] == 1 for w in corrections)
    assert all(w["worker"] == "metrics-test" for w in by_id.values())

    # `sluice tail llm.metrics -b --no-follow`: one readable line per window
    lines: list[str] = []
    count = await tail(
        settings.kafka_bootstrap,
        settings.metrics_topic,
        AvroCodec.default(),
        lambda entry: lines.append(format_line(entry)),
        from_beginning=True,
        follow=False,
        idle_exit_s=1.0,
    )
    assert count == len(windows) == len(lines)
    first_line = next(line for line in lines if " 10s m/v1 req 8 " in line)
    assert "(ERROR 2 OK 6)" in first_line and "p50 50ms" in first_line
    assert "tok/s 6.4" in first_line and "feedback 3 (+0.33)" in first_line
    assert sum("CORRECTION +1 late" in line for line in lines) == 2
