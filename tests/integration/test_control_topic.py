"""The control topic as the one rollout state, on the real broker: a listener folds the whole
history and adopts it once, then applies live commands; the CLI folds the topic to show the
state and to refuse commands every worker would ignore (nothing is published then)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from typer.testing import CliRunner

from connectors.cli import app
from connectors.client import SluiceClient
from inference.registry import ModelRegistry, UnknownVersionError
from schemas.codec import AvroCodec
from streams.control import ControlListener, read_rollout
from streams.rollout import RolloutState
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration


async def _send(settings: Settings, *commands: tuple[str, dict]) -> None:
    async with SluiceClient(settings) as client:
        for verb, fields in commands:
            await client.send_control(verb, model=settings.model_name, **fields)


async def test_catch_up_folds_then_adopts_once_then_follows(settings_factory) -> None:
    settings = settings_factory(partitions=1)
    await ensure_topics(settings, settings.kafka_bootstrap)
    history = [("LOAD", {"version": f"v{i}"}) for i in range(1, 6)]
    history += [("CANARY", {"percent": 250}), ("CANARY", {"percent": 20})]
    await _send(settings, *history)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    await producer.send_and_wait(settings.control_topic, b"not avro", key=b"m")  # skipped
    await producer.stop()

    adopted: list[RolloutState] = []
    applied: list[dict] = []

    async def adopt(state: RolloutState) -> None:
        adopted.append(state)

    async def apply(command: dict) -> None:
        applied.append(command)

    listener = ControlListener(
        settings.kafka_bootstrap, settings.control_topic, AvroCodec.default(), apply, adopt=adopt
    )
    try:
        assert await listener.catch_up(timeout=30) == 7
        assert adopted == [RolloutState(candidate="v5", canary_percent=20)], "adopted once"
        assert applied == [], "history is folded, not applied command by command"
        follow = asyncio.create_task(listener.run())
        await _send(settings, ("PROMOTE", {}))
        for _ in range(100):
            if applied:
                break
            await asyncio.sleep(0.1)
        follow.cancel()
        assert [c["command"] for c in applied] == ["PROMOTE"] and len(adopted) == 1
    finally:
        await listener.stop()

    folded = await read_rollout(
        settings.kafka_bootstrap, settings.control_topic, AvroCodec.default()
    )
    assert folded.state == RolloutState(current="v5", previous=(None,)) and folded.commands == 8


async def test_without_adopt_history_is_applied_one_by_one(settings_factory) -> None:
    settings = settings_factory(partitions=1)
    await ensure_topics(settings, settings.kafka_bootstrap)
    await _send(settings, ("LOAD", {"version": "v1"}), ("PROMOTE", {}))
    applied: list[str] = []

    async def apply(command: dict) -> None:
        applied.append(command["command"])

    listener = ControlListener(
        settings.kafka_bootstrap, settings.control_topic, AvroCodec.default(), apply
    )
    try:
        assert await listener.catch_up(timeout=30) == 2
    finally:
        await listener.stop()
    assert applied == ["LOAD", "PROMOTE"]


async def test_missing_topic_folds_to_the_base_model(settings_factory) -> None:
    settings = settings_factory()
    log = await read_rollout(settings.kafka_bootstrap, settings.control_topic, AvroCodec.default())
    assert (log.state, log.commands, log.topic_exists) == (RolloutState(), 0, False)


def test_cli_checks_commands_against_the_fold(
    settings_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_factory(partitions=1, registry_dir=tmp_path / "registry")
    asyncio.run(ensure_topics(settings, settings.kafka_bootstrap))
    for name in ("kafka_bootstrap", "control_topic", "registry_dir", "home", "model_name"):
        monkeypatch.setenv(f"SLUICE_{name.upper()}", str(getattr(settings, name)))
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ModelRegistry(settings.registry_path).register(folder, "v2")
    runner = CliRunner()

    def sent() -> list[dict]:
        return asyncio.run(
            read_topic(settings, settings.control_topic, until=lambda rs: False, timeout=3)
        )

    refused = runner.invoke(app, ["model", "canary", "20"])
    assert refused.exit_code == 2, refused.output
    assert "no candidate loaded" in refused.output and "nothing was sent" in refused.output
    assert runner.invoke(app, ["model", "promote"]).exit_code == 2
    assert runner.invoke(app, ["model", "rollback"]).exit_code == 2
    unknown = runner.invoke(app, ["model", "load", "v9"])
    assert isinstance(unknown.exception, UnknownVersionError)
    assert sent() == [], "no refused command was published"

    loaded = runner.invoke(app, ["model", "load", "v2"])
    assert loaded.exit_code == 0, loaded.output
    assert runner.invoke(app, ["model", "canary", "20"]).exit_code == 0
    again = runner.invoke(app, ["model", "load", "v2"])
    assert again.exit_code == 0  # a LOAD of the candidate again is allowed (canary back to 0)
    status = runner.invoke(app, ["model", "status"])
    assert status.exit_code == 0, status.output
    assert "candidate: v2 (canary 0%)" in status.output
    assert "current:   base" in status.output
    assert runner.invoke(app, ["model", "promote"]).exit_code == 0
    assert "already the current" in runner.invoke(app, ["model", "load", "v2"]).output
    assert [c["command"] for c in sent()] == ["LOAD", "CANARY", "LOAD", "PROMOTE"]
    status = runner.invoke(app, ["model", "status"])
    assert "current:   v2" in status.output and "previous:  base" in status.output
