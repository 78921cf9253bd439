"""Shared fixtures: one real Apache Kafka broker per test session, workers as processes.

Broker choice, in order: ``SLUICE_TEST_BOOTSTRAP`` (an existing cluster), a testcontainers
Kafka where a Docker daemon answers and ``SLUICE_TEST_DOCKER=1``, else the project's own
local KRaft broker (``deploy.local_kafka``) in a temporary home.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local_kafka import default_cache_dir, ephemeral_broker
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".sluice"


@pytest.fixture(autouse=True)
def _no_repeat_filter_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """A CLI command run in-process (``CliRunner``) puts a ``RepeatFilter`` on every root
    handler, pytest's own capture handlers included, which pytest reuses for every test:
    later tests would then miss a warning logged twice within 10 s. Take them off again."""
    yield
    from streams.log_limits import RepeatFilter

    plugin = request.config.pluginmanager.get_plugin("logging-plugin")
    handlers = list(logging.getLogger().handlers)
    handlers += [getattr(plugin, n, None) for n in ("caplog_handler", "report_handler")]
    for handler in filter(None, handlers):
        for f in [f for f in handler.filters if isinstance(f, RepeatFilter)]:
            handler.removeFilter(f)


def _docker_kafka() -> Iterator[str]:  # pragma: no cover - needs a Docker daemon
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("SLUICE_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    if os.environ.get("SLUICE_TEST_DOCKER") == "1":
        yield from _docker_kafka()
        return
    home = tmp_path_factory.mktemp("kafka-home")
    with ephemeral_broker(home, cache_dir=default_cache_dir()) as info:
        yield info.bootstrap


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The converted SmolLM2 folder (converted once per machine, shared with `make demo`)."""
    from inference.backends.model_files import resolve_model_dir

    return resolve_model_dir(None, STATE / "models")


@pytest.fixture
def settings_factory(kafka_bootstrap: str):  # type: ignore[no-untyped-def]
    """Settings on their own topics and consumer group, so tests never see each other."""

    def make(**overrides: object) -> Settings:
        tag = uuid.uuid4().hex[:8]
        fields: dict[str, object] = {
            "home": STATE,
            "kafka_bootstrap": kafka_bootstrap,
            "app_id": f"sluice-test-{tag}",
            "requests_topic": f"t{tag}.requests",
            "results_topic": f"t{tag}.results",
            "dlq_topic": f"t{tag}.requests.dlq",
            "feedback_topic": f"t{tag}.feedback",
            "training_topic": f"t{tag}.training-examples",
            "metrics_topic": f"t{tag}.metrics",
            "control_topic": f"t{tag}.control",
            "metrics_port": 0,
            "partitions": 4,
        }
        fields.update(overrides)
        return Settings(**fields)  # type: ignore[arg-type]

    return make
