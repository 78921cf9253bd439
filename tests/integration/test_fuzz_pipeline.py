"""The fuzz run against the real pipeline: bad payloads mixed with valid requests.

A bounded ``sluice fuzz`` (``connectors.fuzzing.run``) on the real broker with a worker
process: every payload that must be dead-lettered is, with a reason (the expected reason
where it is known in advance), every valid request is answered, nothing is missing or
answered twice, the worker stays alive with bounded memory, and its commits reach the end
of every partition. On the benchmark engine for volume, and on the real torch engine for
hostile sampling values next to valid batch-mates. Run with ``-s`` to see the ``FUZZ``
lines with the counts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from connectors.fuzzing.run import FuzzOptions, _delete_topics, format_report, run_fuzz
from streams.feedback_join import changelog_topic
from streams.settings import Settings
from streams.topics import DAY_MS

pytestmark = [pytest.mark.integration]

#: Resident memory the worker may add over a run: a leak of the payloads (tens of MB of
#: bad bytes) or of per-record state would show far above this.
RSS_GROWTH_MB = 300


def _check(report, label: str) -> None:  # type: ignore[no-untyped-def]
    lines = format_report(report)
    print("\nFUZZ " + label + "\n  " + "\n  ".join(lines))
    assert report.problems() == [], "\n".join(lines)
    summary = report.tally.summary()
    assert summary["must_dlq"] > 0 and summary["must_dlq_in_dlq"] == summary["must_dlq"]
    rss = report.rss_mb
    assert rss["start"] > 0 and rss["peak"] - rss["start"] < RSS_GROWTH_MB, rss
    assert report.worker_exit == 0  # a clean shutdown after the run


def test_fuzz_on_the_benchmark_engine(settings_factory) -> None:  # type: ignore[no-untyped-def]
    settings: Settings = settings_factory()
    report = run_fuzz(
        settings,
        FuzzOptions(bad=1_500, valid=150, seed=11, backend="benchmark", timeout_s=120),
        progress=lambda line: None,
    )
    _check(report, "benchmark engine, 1500 bad + 150 valid")
    summary = report.tally.summary()
    assert set(summary["sent_by_family"]) == {
        "valid",
        "random",
        "bitflip",
        "truncated",
        "wrong_id",
        "hostile",
        "keys",
    }
    for reason in ("undecodable", "unknown_schema", "wrong_schema", "bad_sampling"):
        assert summary["dlq_by_reason"].get(reason, 0) > 0, summary["dlq_by_reason"]
    assert summary["answered"]["valid: OK"] == 150


@pytest.mark.slow
def test_hostile_values_on_the_torch_engine(settings_factory, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """NaN/inf temperatures, tiny top_p, extreme seeds and priorities next to valid
    requests on the real model: no batch-mate is answered ERROR. The worker runs the
    feedback join too (role all), so the join changelog's retention configs are checked
    on the topic Faust created."""
    settings: Settings = settings_factory(tombstone_retention_ms=2 * DAY_MS)
    report = run_fuzz(
        settings,
        FuzzOptions(
            bad=100,
            valid=20,
            seed=5,
            backend="torch",
            families=("hostile",),
            timeout_s=240,
            role="all",
            keep_topics=True,
        ),
        progress=lambda line: None,
    )
    try:
        _check(report, "torch engine, 100 hostile + 20 valid")
        answered = report.tally.summary()["answered"]
        assert answered["valid: OK"] == 20
        assert sum(n for k, n in answered.items() if k.startswith("normalised")) > 0
        configs = asyncio.run(_changelog_configs(report.settings))
        assert configs["cleanup.policy"] == "compact"
        assert configs["delete.retention.ms"] == str(2 * DAY_MS)
        assert configs["max.compaction.lag.ms"] == str(DAY_MS)
    finally:
        asyncio.run(_delete_topics(report.settings))


async def _changelog_configs(settings: Settings) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, changelog_topic(settings))
        (response,) = await admin.describe_configs([resource])
        (_, _, _, _, entries), *_ = response.resources
        return {entry[0]: entry[1] for entry in entries}
    finally:
        await admin.close()
