"""A worker process and the client on a Schema Registry that requires mutual TLS and basic
auth (the HTTPS test registry of ``tests/unit/test_schemas_registry_tls.py``), over the real
broker: with the right settings a request is answered with registry ids; with a wrong
password the worker stops at start and says why (a configuration error, not an outage)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from connectors.client import SluiceClient
from connectors.processes import WORKER_READY, WorkerProcess, settings_env
from streams.topics import ensure_topics
from tests.integration.helpers import start_worker
from tests.unit.test_schemas_registry_tls import (
    KEY_PASSWORD,
    PASSWORD,
    USER,
    Pki,
    SecureRegistry,
    make_pki,
)

pytestmark = pytest.mark.integration
pytest.importorskip("confluent_kafka.schema_registry")

BENCHMARK = {"backend": "benchmark", "model_name": "benchmark", "feedback_join": False}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("registry-pki"))


def _registry_fields(registry: SecureRegistry, pki: Pki, password: str) -> dict[str, object]:
    return {
        "schema_registry_url": registry.url,
        "schema_registry_ca_file": pki.ca,
        "schema_registry_certfile": pki.client_cert,
        "schema_registry_keyfile": pki.client_key,
        "schema_registry_key_password": SecretStr(KEY_PASSWORD),
        "schema_registry_username": USER,
        "schema_registry_password": SecretStr(password),
    }


def test_worker_and_client_on_an_mtls_registry(settings_factory, pki: Pki, tmp_path: Path) -> None:
    with SecureRegistry(pki) as registry:
        settings = settings_factory(**BENCHMARK, **_registry_fields(registry, pki, PASSWORD))
        asyncio.run(ensure_topics(settings, settings.kafka_bootstrap))
        worker = start_worker(settings, tmp_path)
        try:

            async def ask() -> tuple[dict, bytes]:
                async with SluiceClient(settings) as client:
                    request_id = await client.publish("over mTLS", max_new_tokens=4)
                    result = await client.result(request_id, timeout=60)
                    return result, client.codec.header("InferenceResult")

            result, header = asyncio.run(ask())
        finally:
            code = worker.stop(timeout=60)
        assert result["status"] == "OK"
        assert code == 0, worker.log_tail(40)
        subjects = {path.split("?")[0] for method, path, _ in registry.requests if method == "POST"}
        # the worker registered what it writes, the client what it writes, both over mTLS
        assert "/subjects/dev.sluice.InferenceResult/versions" in subjects
        assert "/subjects/dev.sluice.InferenceRequest/versions" in subjects
        assert header[0] == 0 and int.from_bytes(header[1:]) < 100, "a registry id, not a hash"
        assert {cn for _, _, cn in registry.requests} == {"sluice-worker"}


def test_worker_with_a_wrong_registry_password_stops_and_says_why(
    settings_factory, pki: Pki, tmp_path: Path
) -> None:
    with SecureRegistry(pki) as registry:
        settings = settings_factory(**BENCHMARK, **_registry_fields(registry, pki, "wrong-pw"))
        asyncio.run(ensure_topics(settings, settings.kafka_bootstrap))
        worker = WorkerProcess(tmp_path / "worker.log", env=settings_env(settings)).start()
        try:
            assert worker.proc is not None
            code = worker.proc.wait(timeout=120)
        finally:
            worker.kill()
    log = worker.log_file.read_text()
    assert code != 0 and WORKER_READY not in log
    assert "the registry refused our credentials" in log, worker.log_tail(40)
    assert "wrong-pw" not in log
