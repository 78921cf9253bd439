"""The topics Sluice uses, their partitions and configs, and creating them.

Retention is a data-protection decision per topic (``docs/data-protection.md``): raw
prompts, answers and user ids are kept only as long as the pipeline needs them. The
settings an operator tunes are ``Settings.*_retention_ms``; what is not tunable is fixed
here with the reason. Configs apply when a topic is created; existing topics keep theirs
(change them with ``kafka-configs.sh --alter``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from streams.settings import Settings

logger = logging.getLogger(__name__)

HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def _deleted_after(ms: int) -> dict[str, str]:
    """A log whose records are deleted ``ms`` after they were written (-1: never).

    Kafka deletes whole segments, so a record lives up to ``retention.ms`` + ``segment.ms``;
    with the broker's default segment (7 days) a 3-day retention would keep data 10 days.
    Segments roll daily (or at the retention, when shorter) to keep the bound tight."""
    if ms == -1:
        return {"cleanup.policy": "delete", "retention.ms": "-1"}
    return {"cleanup.policy": "delete", "retention.ms": str(ms), "segment.ms": str(min(ms, DAY_MS))}


def compacted_configs(settings: Settings) -> dict[str, str]:
    """A compacted log whose overwritten values and tombstones really go: a key's old value
    becomes eligible for compaction at most ``compaction_max_lag_ms`` after it was written
    (the active segment is rolled for it), and a tombstone is kept ``tombstone_retention_ms``
    so readers see the deletion, then removed with the key."""
    return {
        "cleanup.policy": "compact",
        "delete.retention.ms": str(settings.tombstone_retention_ms),
        "max.compaction.lag.ms": str(settings.compaction_max_lag_ms),
    }


def changelog_configs(settings: Settings) -> dict[str, str]:
    """Extra configs of the feedback join table's changelog (Faust creates it compacted;
    its name depends on the worker role, see ``streams.feedback_join.changelog_topic``).
    It holds raw prompts and answers for one feedback window, then a tombstone per key."""
    configs = compacted_configs(settings)
    del configs["cleanup.policy"]  # Faust sets it (compacting=True)
    return configs


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic Sluice creates. Requests, results, feedback and training examples share
    the partition count (co-partitioned by request_id)."""
    n = settings.partitions
    dlq = _deleted_after(settings.dlq_retention_ms)
    return [
        TopicSpec(settings.requests_topic, n, _deleted_after(settings.requests_retention_ms)),
        TopicSpec(settings.results_topic, n, _deleted_after(settings.results_retention_ms)),
        TopicSpec(settings.dlq_topic, 1, dict(dlq)),
        TopicSpec(settings.feedback_topic, n, _deleted_after(settings.feedback_retention_ms)),
        TopicSpec(settings.feedback_dlq_topic, 1, dict(dlq)),
        # redacted, pseudonymous; one record per request_id; a tombstone erases one
        TopicSpec(settings.training_topic, n, compacted_configs(settings)),
        TopicSpec(settings.metrics_topic, 1, _deleted_after(settings.metrics_retention_ms)),
        # the rollout state is the fold of the whole topic: it must never expire
        TopicSpec(settings.control_topic, 1, _deleted_after(-1)),
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
