"""Every Sluice client on a TLS-only broker (SASL_SSL, SCRAM-SHA-512, ACLs).

One secure local broker for this file (``LocalKafka(secure=True)``, what ``sluice kafka up
--secure`` starts): a client without credentials, or with a wrong password, is refused; a
producer principal cannot write ``llm.control``; a worker process started from
``secure.env`` answers a request published with ``producer.env``'s credentials, and ignores
a control command the operator principal sends signed with a wrong key (it applies the
correctly signed one); and each client built in-process connects over TLS with the settings
of its principal.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from connectors.client import SluiceClient
from connectors.processes import WORKER_READY, WorkerProcess
from deploy.local_kafka import LocalKafka, default_cache_dir
from schemas.codec import AvroCodec
from streams.settings import Settings
from streams.topics import ensure_topics

pytestmark = pytest.mark.integration

BENCHMARK = {"backend": "benchmark", "model_name": "benchmark", "metrics_port": 0}


@dataclass(frozen=True)
class SecureCluster:
    kafka: LocalKafka
    bootstrap: str
    home: Path

    def settings(self, role: str, **overrides: Any) -> Settings:
        """Settings of ``role`` (worker, producer, operator, admin) on this broker."""
        fields: dict[str, Any] = {"home": self.home, **BENCHMARK}
        fields.update(self.kafka.settings_fields(role, self.bootstrap))
        fields.update(overrides)
        return Settings(**fields)

    def env(self, role: str) -> dict[str, str]:
        """The ``SLUICE_*`` variables of ``role``'s env file, as a shell would read them."""
        env = {}
        for line in self.kafka.env_file(role).read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = shlex.split(value)[0]
        return env


@pytest.fixture(scope="session")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    home = tmp_path_factory.mktemp("secure-kafka-home")
    kafka = LocalKafka(home, cache_dir=default_cache_dir(), secure=True)
    try:
        info = kafka.up(timeout=120)
        cluster = SecureCluster(kafka, info.bootstrap, home)
        # what `sluice kafka up --secure` does next: topics, by the broker's own principal
        asyncio.run(ensure_topics(cluster.settings("admin"), info.bootstrap))
        yield cluster
    finally:
        kafka.down()


def _request_value(client: SluiceClient, prompt: str) -> tuple[bytes, bytes]:
    record = client.build_request(prompt, max_new_tokens=4)
    return record["request_id"].encode(), client.codec.encode("InferenceRequest", record)


# ---------------------------------------------------------------------- who is refused


@pytest.mark.parametrize("how", ["plaintext", "tls-without-sasl", "wrong-password"])
async def test_client_without_valid_credentials_is_refused(secure: SecureCluster, how: str) -> None:
    options: dict[str, Any] = {}
    if how != "plaintext":
        good = secure.settings("producer").kafka_client_options()
        options = {"security_protocol": "SSL", "ssl_context": good["ssl_context"]}
        if how == "wrong-password":
            options = {**good, "sasl_plain_password": "not-the-password"}
    producer = AIOKafkaProducer(
        bootstrap_servers=secure.bootstrap, request_timeout_ms=5000, **options
    )
    with pytest.raises((KafkaConnectionError, KafkaError)):
        try:
            await producer.start()
            await producer.send_and_wait("llm.requests", b"x")
        finally:
            await producer.stop()


async def test_producer_cannot_write_the_control_topic(secure: SecureCluster) -> None:
    async with SluiceClient(secure.settings("producer")) as client:
        with pytest.raises(TopicAuthorizationFailedError):
            await client.send_control("CANARY", model="benchmark", version="v2", percent=100)


async def test_only_operators_write_control_and_workers_read_it(secure: SecureCluster) -> None:
    from streams.control import read_rollout

    operator = secure.settings("operator")
    client = SluiceClient(operator)
    await client.start(watch_results=False)
    try:
        await client.send_control("LOAD", model="benchmark", version="v1", issued_by="test")
    finally:
        await client.stop()
    worker = secure.settings("worker")
    log = await read_rollout(
        secure.bootstrap,
        worker.control_topic,
        AvroCodec.default(),
        worker.kafka_client_options(),
        timeout=30,
    )  # streams.control.ControlListener over TLS, as a worker reads it at start
    assert log.topic_exists and log.commands >= 1


# ---------------------------------------------------------------------- the worker process


def test_worker_from_secure_env_answers_a_producer(secure: SecureCluster, tmp_path: Path) -> None:
    from streams import app as app_module

    worker_settings = secure.settings("worker")
    credentials = app_module._credentials(worker_settings)
    # the Faust app gets TLS too (it used to be dropped: SASL over plain text)
    assert getattr(credentials, "ssl_context", None) is not None
    env = {
        **secure.env("worker"),
        "SLUICE_HOME": str(secure.home),
        "SLUICE_BACKEND": "benchmark",
        "SLUICE_MODEL_NAME": "benchmark",
        "SLUICE_METRICS_PORT": "0",
    }
    worker = WorkerProcess(tmp_path / "worker.log", env=env)
    worker.start()
    try:
        assert worker.wait_for_log("[^Worker]: Ready", timeout=150), worker.log_tail(40)

        async def ask() -> dict[str, Any]:
            producer = Settings(home=secure.home, **_fields_from_env(secure.env("producer")))
            async with SluiceClient(producer) as client:
                request_id = await client.publish("Over TLS?", max_new_tokens=4)
                return await client.result(request_id, timeout=60)

        result = asyncio.run(ask())
        assert result["status"] == "OK"
    finally:
        code = worker.stop(timeout=60)
    assert code == 0, worker.log_tail(40)


def _fields_from_env(env: dict[str, str]) -> dict[str, Any]:
    return {key.removeprefix("SLUICE_").lower(): value for key, value in env.items()}


async def _send_control(settings: Settings, verb: str, **fields: Any) -> str:
    client = SluiceClient(settings)
    await client.start(watch_results=False)
    try:
        return await client.send_control(verb, model=settings.model_name, **fields)
    finally:
        await client.stop()


def _scrape(worker: WorkerProcess) -> str:
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", worker.log_file.read_text())
    assert match, "worker did not log its metrics address"
    with urllib.request.urlopen(match.group(1), timeout=10) as response:
        return response.read().decode()


def test_worker_ignores_a_control_command_signed_with_a_wrong_key(
    secure: SecureCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import SecretStr

    from inference.registry import ModelRegistry
    from streams.control import read_rollout
    from streams.control_auth import control_keys

    operator = secure.settings("operator")
    assert "SLUICE_CONTROL_SIGNING_KEY" in secure.env("worker")
    assert "SLUICE_CONTROL_SIGNING_KEY" not in secure.env("producer")
    version = f"signed-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    ModelRegistry(operator.registry_path).register(folder, version)
    env = {
        **secure.env("worker"),
        "SLUICE_HOME": str(secure.home),
        "SLUICE_BACKEND": "benchmark",
        "SLUICE_MODEL_NAME": "benchmark",
        "SLUICE_METRICS_PORT": "0",
    }
    worker = WorkerProcess(tmp_path / "worker.log", env=env)
    worker.start()
    try:
        assert worker.wait_for_log(WORKER_READY, timeout=150), worker.log_tail(40)
        assert "only those signed with key id local are applied" in worker.log_file.read_text()
        assert "not authenticated" not in worker.log_file.read_text()
        # the operator principal (the broker accepts the write), the key id the workers
        # know, the wrong secret
        forged = operator.model_copy(update={"control_signing_key": SecretStr("f" * 32)})
        forged_id = asyncio.run(_send_control(forged, "LOAD", version=version))
        assert worker.wait_for_log(f"ignoring control command {forged_id}", timeout=60), (
            worker.log_tail(40)
        )
        assert "bad_signature" in worker.log_tail(40)
        metrics = _scrape(worker)
        assert 'sluice_control_rejected_total{reason="bad_signature"} 1.0' in metrics, metrics
        assert f'version="{version}"' not in metrics, "the forged LOAD changed the rollout"

        asyncio.run(_send_control(operator, "LOAD", version=version))
        assert worker.wait_for_log(f"candidate='{version}'", timeout=60), worker.log_tail(40)
        metrics = _scrape(worker)
        assert f'version="{version}"' in metrics, "the signed LOAD was not applied"
        assert 'sluice_control_rejected_total{reason="bad_signature"} 1.0' in metrics

        # the CLI's fold (read_rollout with the operator's keys) agrees with the worker
        log = asyncio.run(
            read_rollout(
                secure.bootstrap,
                operator.control_topic,
                AvroCodec.default(),
                operator.kafka_client_options(),
                timeout=30,
                keys=control_keys(operator),
            )
        )
        assert log.state.candidate == version
        assert log.rejected.get("bad_signature", 0) >= 1
        # and `sluice model status` (operator.env) shows it
        from typer.testing import CliRunner

        from connectors.cli import app

        for key, value in {**secure.env("operator"), "SLUICE_HOME": str(secure.home)}.items():
            monkeypatch.setenv(key, value)
        status = CliRunner().invoke(app, ["model", "status"])
        assert status.exit_code == 0, status.output
        assert f"candidate: {version}" in status.output
        assert "ignored" in status.output and "bad_signature" in status.output
    finally:
        code = worker.stop(timeout=60)
    assert code == 0, worker.log_tail(40)


# ---------------------------------------------------------------------- each client on TLS


async def test_sluice_client_publishes_and_watches_results(secure: SecureCluster) -> None:
    async with SluiceClient(secure.settings("producer")) as client:
        request_id = await client.publish("hello", max_new_tokens=4)
        await client.send_feedback(request_id, 1)
    assert request_id


async def test_outbox_producer_and_answered_index(secure: SecureCluster) -> None:
    from streams.dedup import load_answered
    from streams.kafka_clients import OutboxProducer

    settings = secure.settings("worker")
    options = settings.kafka_client_options()
    assert await ensure_topics(settings, secure.bootstrap) == []  # the worker's admin client
    key = f"answered-{uuid.uuid4().hex}".encode()
    outbox = OutboxProducer(secure.bootstrap, options)
    await outbox.start()
    try:
        delivery = await outbox.send(settings.results_topic, key, b"x", None, None, None)
        await delivery
    finally:
        await outbox.stop()
    index = await load_answered(
        secure.bootstrap, [settings.results_topic, settings.dlq_topic], 1000, options
    )
    assert key.decode() in index


async def test_hole_reader_reads_a_range_and_the_groups_offsets(secure: SecureCluster) -> None:
    from streams.holes import HoleReader

    producer_settings = secure.settings("producer")
    key, value = _request_value(SluiceClient(producer_settings), "a hole")
    producer = AIOKafkaProducer(
        bootstrap_servers=secure.bootstrap, acks="all", **producer_settings.kafka_client_options()
    )
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            producer_settings.requests_topic, value, key=key, partition=0
        )
    finally:
        await producer.stop()
    worker = secure.settings("worker")
    reader = HoleReader(secure.bootstrap, worker.app_id, worker.kafka_client_options())
    tp = TopicPartition(worker.requests_topic, 0)
    try:
        records = await reader.read(tp, meta.offset, meta.offset + 1)
        committed = await _committed(reader, tp)  # its admin client, on the workers' group
    finally:
        await reader.close()
    assert [r.key for r in records] == [key]
    assert committed is None or committed >= 0


async def _committed(reader: Any, tp: TopicPartition) -> int | None:
    """The group's committed offset; a fresh broker creates its offsets topic on first use."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + 30
    while True:
        try:
            return await reader.committed(tp)
        except GroupCoordinatorNotAvailableError:
            if loop.time() > give_up:
                raise
            await asyncio.sleep(0.5)


async def test_tail_and_replay_as_operator(secure: SecureCluster, tmp_path: Path) -> None:
    from connectors.replay import replay
    from connectors.tail import tail

    async with SluiceClient(secure.settings("producer")) as client:
        await client.publish("for the operator", max_new_tokens=4)
    operator = secure.settings("operator")
    options = operator.kafka_client_options()
    seen: list[dict[str, Any]] = []
    count = await tail(
        secure.bootstrap,
        operator.requests_topic,
        AvroCodec.default(),
        seen.append,
        from_beginning=True,
        follow=False,
        idle_exit_s=1.0,
        client_options=options,
    )
    assert count >= 1 and len(seen) == count
    summary = await replay(
        secure.bootstrap,
        operator.requests_topic,
        tmp_path / "requests.jsonl",
        client_options=options,
    )
    assert (tmp_path / "requests.jsonl").is_file()
    assert summary is not None
