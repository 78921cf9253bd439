"""The local development broker: start, answer, stop, restart on the same port, recover.

Each test runs its own broker under ``tmp_path``; the jars come from the shared cache
(``default_cache_dir()``, i.e. ``<repo>/.sluice/kafka`` in a checkout) so they are fetched once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.local_kafka import (
    BrokerInfo,
    LocalKafka,
    LocalKafkaError,
    default_cache_dir,
    ephemeral_broker,
    probe_broker,
)

pytestmark = pytest.mark.integration

JAR_CACHE = default_cache_dir()


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    local = LocalKafka(tmp_path / "home", cache_dir=JAR_CACHE)
    try:
        yield local
    finally:
        local.down()


def _port(info: BrokerInfo) -> int:
    return int(info.bootstrap.rsplit(":", 1)[1])


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _consume_first(bootstrap: str, topic: str) -> bytes | None:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        return record.value
    finally:
        await consumer.stop()


async def test_up_produce_down_up_keeps_port_and_data(kafka: LocalKafka) -> None:
    steps: list[str] = []
    info = await asyncio.to_thread(kafka.up, 90.0, steps.append)
    assert info.bootstrap.startswith("127.0.0.1:")
    assert info.kafka_version == "4.4.0"
    assert any("formatting" in step for step in steps)
    assert kafka.status() == info
    state = json.loads((kafka.state_dir / "broker.json").read_text())
    assert state["bootstrap"] == info.bootstrap and state["pid"] == info.pid
    # up() again while it runs is a no-op that returns the same broker.
    assert await asyncio.to_thread(kafka.up) == info

    topic = f"local-kafka-{uuid.uuid4().hex[:8]}"
    await _produce(info.bootstrap, topic, b"survives a restart")
    assert await _consume_first(info.bootstrap, topic) == b"survives a restart"

    assert await asyncio.to_thread(kafka.down) is True
    assert kafka.status() is None
    assert not (kafka.state_dir / "broker.pid").exists()
    assert await asyncio.to_thread(kafka.down) is False

    steps.clear()
    again = await asyncio.to_thread(kafka.up, 90.0, steps.append)
    assert again.bootstrap == info.bootstrap  # same port: remembered bootstraps keep working
    assert again.pid != info.pid
    assert not any("formatting" in step for step in steps)  # data dir kept, not reformatted
    assert await _consume_first(again.bootstrap, topic) == b"survives a restart"


def test_up_recovers_from_dead_and_foreign_pid_files(kafka: LocalKafka) -> None:
    info = kafka.up()
    os.kill(info.pid, signal.SIGKILL)  # a crash: pid file and broker.json stay behind
    deadline = time.monotonic() + 10
    while kafka.status() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kafka.status() is None
    assert (kafka.state_dir / "broker.pid").exists()

    recovered = kafka.up()
    assert recovered.bootstrap == info.bootstrap
    assert recovered.pid != info.pid
    probe_broker("127.0.0.1", _port(recovered))
    assert kafka.down() is True

    # A pid file whose pid was reused by some other live process: never ours to signal.
    (kafka.state_dir / "broker.pid").write_text(f"{os.getpid()}\n")
    (kafka.state_dir / "broker.json").write_text(
        json.dumps({"bootstrap": info.bootstrap, "pid": os.getpid(), "kafka_version": "4.4.0"})
    )
    assert kafka.status() is None
    assert kafka.down() is False  # and this test process is still alive to check it


def test_ephemeral_broker_is_always_stopped(tmp_path: Path) -> None:
    home = tmp_path / "eph"
    with pytest.raises(RuntimeError), ephemeral_broker(home, cache_dir=JAR_CACHE) as info:
        probe_broker("127.0.0.1", _port(info))
        assert LocalKafka(home, cache_dir=JAR_CACHE).status() == info
        raise RuntimeError("test body failed")
    assert LocalKafka(home, cache_dir=JAR_CACHE).status() is None
    with pytest.raises(OSError):
        probe_broker("127.0.0.1", _port(info), timeout=1.0)


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        local = LocalKafka(tmp_path / "home", port=busy, cache_dir=JAR_CACHE)
        with pytest.raises(LocalKafkaError, match=f"port {busy} .* busy"):
            local.up()


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(LocalKafkaError, match="mvn"):
        LocalKafka(tmp_path / "home").fetch()  # its own, empty jar cache


def test_broker_that_dies_reports_its_log_and_leaves_nothing_running(kafka: LocalKafka) -> None:
    doomed = LocalKafka(kafka.home, heap="1k", cache_dir=JAR_CACHE)  # the JVM refuses this heap
    with pytest.raises(LocalKafkaError, match="exited") as caught:
        doomed.up(timeout=30)
    assert "Too small maximum heap" in str(caught.value)
    assert doomed.status() is None
    assert not (doomed.state_dir / "broker.pid").exists()
