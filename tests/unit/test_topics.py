"""Topic configs Sluice creates."""

from __future__ import annotations

from pathlib import Path

from streams.settings import Settings
from streams.topics import _with_durability, topic_specs


def test_replicated_topics_need_two_in_sync_replicas(tmp_path: Path) -> None:
    for spec in topic_specs(Settings(home=tmp_path)):
        assert _with_durability(spec.configs, 3)["min.insync.replicas"] == "2"
        assert "min.insync.replicas" not in _with_durability(spec.configs, 1)
    assert _with_durability({"min.insync.replicas": "3"}, 5) == {"min.insync.replicas": "3"}
