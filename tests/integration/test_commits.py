"""Only answered requests are committed: nothing else in the worker may move the intake's
offsets, however long inference takes.

A slow engine (the benchmark engine with a simulated latency) holds every request in flight
for several seconds, longer than Faust's own commit interval. While they are in flight, the
group's committed offsets on the requests topic must stay where they were (nothing
answered); once every result is on the broker, they must reach the end of each partition.
Faust acks the feedback join's copy of each request at once; were Faust allowed to commit
the requests topic, it would commit read-but-unanswered offsets here, and a crash would lose
them (seen in CI as 39 of 200 requests lost after a SIGKILL).
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from connectors.client import SluiceClient
from connectors.processes import WorkerProcess
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = pytest.mark.integration

DELAY_MS = 12_000


async def _committed(settings: Settings) -> dict[int, int]:
    """The group's committed offsets on the requests topic, by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.app_id)
    finally:
        await admin.close()
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == settings.requests_topic and meta.offset >= 0
    }


def _wait_in_flight(worker: WorkerProcess, want: int, timeout: float) -> int:
    """The worker's ``sluice_inflight_requests`` once it reaches ``want`` (or the timeout)."""
    match = None
    give_up = time.monotonic() + timeout
    value = 0
    while time.monotonic() < give_up:
        match = match or re.search(r"metrics: (http://\S+/metrics)", worker.log_tail(400))
        if match:
            with urllib.request.urlopen(match.group(1), timeout=5) as response:
                text = response.read().decode()
            found = re.search(r"^sluice_inflight_requests (\S+)$", text, re.M)
            value = int(float(found.group(1))) if found else 0
            if value >= want:
                return value
        time.sleep(0.2)
    return value


async def test_unanswered_requests_are_never_committed(settings_factory, tmp_path: Path):
    settings = settings_factory(
        backend="benchmark",
        benchmark_delay_ms=DELAY_MS,
        batch_max_size=64,
        batch_max_wait_ms=200,
        commit_interval_ms=100,
        feedback_join=True,  # the join reads the requests topic too, and acks at once
    )
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = start_worker(settings, tmp_path)
    try:
        async with SluiceClient(settings) as client:
            ids = [await client.publish(f"prompt {i}", max_new_tokens=4) for i in range(40)]
            await client.flush()
        # Read by the worker, in flight in the slow engine; Faust commits every ~3 s. The
        # check means something only once the worker holds them all in flight.
        held = await asyncio.to_thread(_wait_in_flight, worker, len(ids), DELAY_MS / 1000 / 2)
        assert held == len(ids), f"only {held} of {len(ids)} requests were read in time"
        await asyncio.sleep(3)
        in_flight = await _committed(settings)
        results = await read_topic(
            settings,
            settings.results_topic,
            timeout=120,
            until=lambda rs: len({r["request_id"] for r in rs}) >= len(ids),
        )
        answered: dict[int, int] = {}
        for _ in range(50):  # the last watermarks follow within a commit interval or two
            answered = await _committed(settings)
            if sum(answered.values()) >= len(ids):
                break
            await asyncio.sleep(0.2)
    finally:
        worker.stop()
    assert {r["request_id"] for r in results} == set(ids)
    assert all(r["status"] == "OK" for r in results)
    assert sum(in_flight.values()) == 0, f"unanswered offsets were committed: {in_flight}"
    assert sum(answered.values()) == len(ids), answered
