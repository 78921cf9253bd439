"""The worker's Faust app: which channels Faust may commit by itself.

Offsets of the requests topic belong to the pipeline's watermarks. Faust turns acks (and
with them its own commits) on for a topic name as soon as any channel on it has acks, so
every agent reading the requests topic must have acks off; results and feedback, read only
by the feedback join, stay Faust's to commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from inference.backends.benchmark import BenchmarkEngine
from schemas.codec import AvroCodec
from streams.app import build_app
from streams.dedup import AnsweredIndex
from streams.metrics import WorkerMetrics
from streams.pipeline import IntakePipeline
from streams.settings import Settings


def _app(tmp_path: Path, feedback_join: bool):  # type: ignore[no-untyped-def]
    settings = Settings(home=tmp_path, feedback_join=feedback_join, model_name="benchmark")
    pipeline = IntakePipeline(
        settings,
        BenchmarkEngine(),
        AvroCodec.default(),
        WorkerMetrics(CollectorRegistry()),
        AnsweredIndex(),
    )
    return settings, build_app(settings, pipeline, "127.0.0.1:9", web_port=6066)


@pytest.mark.parametrize("feedback_join", [True, False])
def test_no_channel_on_the_requests_topic_has_acks(tmp_path: Path, feedback_join: bool) -> None:
    settings, app = _app(tmp_path, feedback_join)
    channels = {name: agent.channel for name, agent in app.agents.items()}
    on_requests = {n: c for n, c in channels.items() if settings.requests_topic in c.topics}
    assert "sluice.intake" in on_requests
    assert all(not c.acks for c in on_requests.values()), {
        n: c.acks for n, c in on_requests.items()
    }
    if feedback_join:
        assert "sluice.feedback-join-requests" in on_requests
        join = channels["sluice.feedback-join"]
        assert set(join.topics) == {settings.results_topic, settings.feedback_topic}
        assert join.acks
    else:
        assert set(channels) == {"sluice.intake"}
