"""The topics Sluice uses, their partitions and configs, and creating them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from streams.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic Sluice uses. Requests and results share the partition count."""
    n = settings.partitions
    week = str(7 * 24 * 3600 * 1000)
    return [
        TopicSpec(settings.requests_topic, n, {"retention.ms": week}),
        TopicSpec(settings.results_topic, n, {"retention.ms": week}),
        TopicSpec(settings.dlq_topic, 1, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
        TopicSpec(settings.feedback_topic, n, {"retention.ms": "-1"}),
        TopicSpec(settings.feedback_dlq_topic, 1, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
        TopicSpec(settings.training_topic, n, {"cleanup.policy": "compact"}),
        TopicSpec(settings.metrics_topic, 1, {"retention.ms": week}),
        TopicSpec(settings.control_topic, 1, {"retention.ms": "-1"}),
    ]


def _with_durability(configs: dict[str, str], replication_factor: int) -> dict[str, str]:
    """With replicas, an ``acks=all`` write must reach at least two of them: one broker's
    loss never loses an acknowledged result (``min.insync.replicas`` = 2, or 1 with RF 1)."""
    if replication_factor > 1 and "min.insync.replicas" not in configs:
        return {**configs, "min.insync.replicas": "2"}
    return configs


async def ensure_topics(settings: Settings, bootstrap: str) -> list[str]:
    """Create missing topics (idempotent). Returns the names it created."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id=f"{settings.app_id}-admin",
        **settings.kafka_client_options(),
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in topic_specs(settings) if s.name not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(
                        s.name,
                        num_partitions=s.partitions,
                        replication_factor=settings.replication_factor,
                        topic_configs=_with_durability(s.configs, settings.replication_factor),
                    )
                    for s in missing
                ]
            )
            logger.info("created topics %s", ", ".join(s.name for s in missing))
        return [s.name for s in missing]
    finally:
        await admin.close()
