"""``sluice top --once`` against the real broker with an inference and a metrics worker:
it shows the worker groups, the request partitions with their lag, a closed window of the
traffic, and the rollout with the last automatic decision."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from connectors.cli import app
from connectors.client import SluiceClient
from connectors.processes import settings_env
from connectors.top import run_top
from schemas.codec import AvroCodec
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_top_once_shows_partitions_windows_and_rollout(
    settings_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_factory(
        backend="benchmark", metrics_window_s=2, metrics_rollup_s=0, metrics_lateness_s=1
    )
    await ensure_topics(settings, settings.kafka_bootstrap)
    inference = start_worker(settings.model_copy(update={"worker_role": "inference"}), tmp_path)
    metrics = start_worker(
        settings.model_copy(update={"worker_role": "metrics"}), tmp_path, "metrics"
    )
    try:
        async with SluiceClient(settings) as client:
            ids = [await client.publish(f"Say {i}.", max_new_tokens=4) for i in range(20)]
            await asyncio.gather(*(client.result(rid, timeout=60) for rid in ids))
            evidence = {"reason": "regression: bad answers +90.0%", "candidate": {"version": "v9"}}
            await client.send_control("LOAD", model=settings.model_name, version="v9")
            await client.send_control(
                "ROLLBACK",
                model=settings.model_name,
                issued_by="canary-auto:test",
                evidence=json.dumps(evidence),
            )
        windows = await read_topic(
            settings,
            settings.metrics_topic,
            timeout=60,
            until=lambda ws: sum(w["requests_total"] for w in ws) >= len(ids),
        )
        assert sum(w["requests_total"] for w in windows) == len(ids)

        console = Console(record=True, width=220)
        snapshot = await asyncio.to_thread(
            run_top, settings, settings.kafka_bootstrap, AvroCodec.default(), console, once=True
        )
        text = console.export_text()
        for monkey_name, value in settings_env(settings).items():
            monkeypatch.setenv(monkey_name, value)
        cli = await asyncio.to_thread(CliRunner().invoke, app, ["top", "--once"])
    finally:
        inference.stop()
        metrics.stop()

    assert {g.role for g in snapshot.groups} >= {"inference", "metrics"}
    # both roles read llm.requests (the metrics job for prompts and tenants): each group's
    # partitions are listed once, with its own committed offset and owner
    for group_id in (settings.app_id, f"{settings.app_id}-metrics"):
        mine = [
            p
            for p in snapshot.partitions
            if p.topic == settings.requests_topic and p.group_id == group_id
        ]
        assert sorted(p.partition for p in mine) == list(range(settings.partitions)), group_id
    requests = [
        p
        for p in snapshot.partitions
        if p.topic == settings.requests_topic and p.group_id == settings.app_id
    ]
    assert sum(p.end_offset for p in requests) == len(ids)
    for p in requests:
        assert f"{settings.requests_topic}" in text and p.owner is not None
    assert sum(int(w["requests_total"]) for w in snapshot.windows) > 0
    assert f"{settings.model_name}/benchmark" in text
    assert "rollout: current base, no candidate" in text and "[2 commands]" in text
    assert "last auto decision: ROLLBACK v9" in text
    assert cli.exit_code == 0, cli.output
    assert "Partitions and lag" in cli.output
