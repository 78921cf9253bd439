"""Which Kafka cluster to talk to: the configured one, else the local broker."""

from __future__ import annotations

from deploy.local_kafka import LocalKafka, LocalKafkaError
from streams.settings import Settings


def local_kafka(settings: Settings) -> LocalKafka:
    return LocalKafka(settings.home, kafka_version=settings.kafka_version)


def resolve_bootstrap(settings: Settings) -> str:
    """``SLUICE_KAFKA_BOOTSTRAP`` if set, else the running local broker's address."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    info = local_kafka(settings).status()
    if info is None:
        raise LocalKafkaError(
            "no Kafka cluster: set SLUICE_KAFKA_BOOTSTRAP=host:port, or start the local "
            "broker with `sluice kafka up`"
        )
    return info.bootstrap
