"""Topic configs Sluice creates: retention per topic is a data-protection decision."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from streams.settings import Settings
from streams.topics import (
    DAY_MS,
    _with_durability,
    changelog_configs,
    compacted_configs,
    topic_specs,
)


def _configs(settings: Settings) -> dict[str, dict[str, str]]:
    return {spec.name: spec.configs for spec in topic_specs(settings)}


def test_replicated_topics_need_two_in_sync_replicas(tmp_path: Path) -> None:
    for spec in topic_specs(Settings(home=tmp_path)):
        assert _with_durability(spec.configs, 3)["min.insync.replicas"] == "2"
        assert "min.insync.replicas" not in _with_durability(spec.configs, 1)
    assert _with_durability({"min.insync.replicas": "3"}, 5) == {"min.insync.replicas": "3"}


def test_production_defaults_keep_raw_data_only_as_long_as_needed(tmp_path: Path) -> None:
    configs = _configs(Settings(home=tmp_path))
    deleted = {
        "llm.requests": 7 * DAY_MS,
        "llm.results": 7 * DAY_MS,
        "llm.requests.dlq": 14 * DAY_MS,  # raw prompts up to 256 KiB
        "llm.feedback.dlq": 14 * DAY_MS,
        "llm.feedback": 30 * DAY_MS,  # raw corrections and user ids
        "llm.metrics": 3 * DAY_MS,
    }
    for topic, ms in deleted.items():
        assert configs[topic] == {
            "cleanup.policy": "delete",
            "retention.ms": str(ms),
            "segment.ms": str(DAY_MS),  # deleted within retention + 1 day, not + 7
        }, topic
    assert configs["llm.control"] == {"cleanup.policy": "delete", "retention.ms": "-1"}
    assert configs["llm.training-examples"] == {
        "cleanup.policy": "compact",
        "delete.retention.ms": str(DAY_MS),
        "max.compaction.lag.ms": str(DAY_MS),
    }
    # every topic has an explicit policy: nothing inherits the broker's defaults
    assert all("cleanup.policy" in c for c in configs.values())
    assert len(configs) == 8


def test_retention_settings_reach_the_topics(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        requests_retention_ms=DAY_MS,
        results_retention_ms=2 * DAY_MS,
        dlq_retention_ms=3 * DAY_MS,
        feedback_retention_ms=-1,
        metrics_retention_ms=3_600_000,
        tombstone_retention_ms=60_000,
        compaction_max_lag_ms=120_000,
    )
    configs = _configs(settings)
    assert configs["llm.requests"]["retention.ms"] == str(DAY_MS)
    assert configs["llm.results"]["retention.ms"] == str(2 * DAY_MS)
    assert configs["llm.requests.dlq"]["retention.ms"] == str(3 * DAY_MS)
    assert configs["llm.feedback.dlq"]["retention.ms"] == str(3 * DAY_MS)
    assert configs["llm.feedback"]["retention.ms"] == "-1"
    assert configs["llm.metrics"]["retention.ms"] == "3600000"
    assert configs["llm.metrics"]["segment.ms"] == "3600000"  # never longer than retention
    assert "segment.ms" not in configs["llm.feedback"]
    assert compacted_configs(settings)["delete.retention.ms"] == "60000"
    assert configs["llm.training-examples"]["max.compaction.lag.ms"] == "120000"


def test_join_changelog_tombstones_clear(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, tombstone_retention_ms=5 * 60_000)
    # Faust creates the changelog compacted; we add how long tombstones and old values live
    assert changelog_configs(settings) == {
        "delete.retention.ms": "300000",
        "max.compaction.lag.ms": str(DAY_MS),
    }


def test_environment_sets_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_DLQ_RETENTION_MS", str(2 * DAY_MS))
    assert _configs(Settings(home=tmp_path))["llm.requests.dlq"]["retention.ms"] == str(2 * DAY_MS)


@pytest.mark.parametrize("value", [0, -2, 59_999])
def test_a_retention_too_short_to_mean_anything_is_refused(tmp_path: Path, value: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="retention"):
        Settings(home=tmp_path, dlq_retention_ms=value)


def test_the_data_protection_table_says_what_the_code_sets(tmp_path: Path) -> None:
    """docs/data-protection.md gives each topic's default retention; it must match."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "data-protection.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in doc.splitlines()
        if line.startswith("| `llm.")
    }
    for name, configs in _configs(Settings(home=tmp_path)).items():
        ms = int(configs.get("retention.ms", "-1"))
        if configs["cleanup.policy"] == "compact":
            assert "compacted" in rows[name], name
        elif ms == -1:
            assert "forever" in rows[name], name
        else:
            assert f"deleted after {ms // DAY_MS} days" in rows[name], name
