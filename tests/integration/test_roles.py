"""Worker roles: inference and the feedback join in separate processes and consumer groups.

An ``inference`` worker answers requests and runs no join; a ``join`` worker (group
``<app_id>-join``) turns results and feedback into training examples without loading a
model. Together they do what one ``all`` worker does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from connectors.client import SluiceClient
from streams.app import join_group
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = pytest.mark.integration


async def _committed_topics(bootstrap: str, group: str) -> set[str]:
    """The topics a consumer group has committed offsets on."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return {tp.topic for tp, meta in offsets.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def test_inference_and_join_roles_run_apart(settings_factory, tmp_path: Path) -> None:
    base = settings_factory(backend="benchmark", model_name="benchmark", feedback_wait_ms=5_000)
    await ensure_topics(base, base.kafka_bootstrap)
    inference = start_worker(base.model_copy(update={"worker_role": "inference"}), tmp_path, "inf")
    join = start_worker(base.model_copy(update={"worker_role": "join"}), tmp_path, "join")
    try:
        async with SluiceClient(base) as client:
            ids = [await client.publish(f"question {i}", max_new_tokens=4) for i in range(5)]
            for rid in ids:
                result = await client.result(rid, timeout=60)
                assert result["status"] == "OK"
                await client.send_feedback(rid, 1, user="tester")
        examples = await read_topic(
            base,
            base.training_topic,
            timeout=90,
            until=lambda rs: {r["request_id"] for r in rs} >= set(ids),
        )
        by_join: set[str] = set()
        for _ in range(40):  # Faust commits the join's offsets every few seconds
            by_join = await _committed_topics(base.kafka_bootstrap, join_group(base))
            if {base.feedback_topic, base.results_topic} <= by_join:
                break
            await asyncio.sleep(0.5)
        by_inference = await _committed_topics(base.kafka_bootstrap, base.app_id)
    finally:
        inference.stop(30)
        join.stop(30)
    assert {r["request_id"] for r in examples} == set(ids)
    assert all(r["user"] != "tester" for r in examples)  # keyed pseudonyms only
    # each group reads only its own role's topics
    assert by_inference == {base.requests_topic}, by_inference
    assert base.feedback_topic in by_join and base.results_topic in by_join, by_join
    assert inference.proc is not None and inference.proc.returncode == 0
    assert join.proc is not None and join.proc.returncode == 0
