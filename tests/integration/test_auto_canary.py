"""The auto canary deciding on the real broker, both ways, while requests keep flowing.

An inference worker and a metrics worker (2 s windows) run on the benchmark backend; two
registered versions stand in for a good and a broken candidate (the broken one answers
every request with an ERROR: ``SLUICE_BENCHMARK_BROKEN_VERSIONS``). ``sluice model canary 50
--auto`` runs as a subprocess: it reads ``llm.metrics``, decides, and publishes PROMOTE or
ROLLBACK with its evidence on ``llm.control``; the worker applies it. Every request gets
exactly one result or dead letter throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from connectors.client import SluiceClient
from connectors.processes import settings_env
from connectors.tail import format_line, tail
from inference.registry import ModelRegistry
from schemas.codec import AvroCodec
from streams.control import read_rollout
from streams.rollout import RolloutState
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GOOD, BAD = "v-good", "v-bad"


class Traffic:
    """Steady requests in the background; remembers every request_id it published."""

    def __init__(self, client: SluiceClient, per_s: float) -> None:
        self.client, self.interval = client, 1.0 / per_s
        self.sent: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while True:
            self.sent.append(await self.client.publish(f"Say a word. ({i})", max_new_tokens=4))
            i += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _register(registry_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    registry = ModelRegistry(registry_dir)
    for version in (GOOD, BAD):
        registry.register(folder, version)


async def _canary(settings: Settings, percent: int, timeout: float) -> tuple[int, str, str]:
    env = {**os.environ, **settings_env(settings)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connectors.cli",
        "model",
        "canary",
        str(percent),
        "--auto",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, errs = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        raise
    return proc.returncode or 0, out.decode(), errs.decode()


async def _scenario(settings: Settings, tmp_path: Path, candidate: str) -> dict:
    await ensure_topics(settings, settings.kafka_bootstrap)
    inference = start_worker(settings.model_copy(update={"worker_role": "inference"}), tmp_path)
    metrics = start_worker(
        settings.model_copy(update={"worker_role": "metrics"}), tmp_path, "metrics"
    )
    try:
        async with SluiceClient(settings) as client:
            traffic = Traffic(client, per_s=60)
            traffic.start()
            await client.send_control("LOAD", model=settings.model_name, version=candidate)
            await asyncio.sleep(3)  # the worker loads it (0 % traffic until CANARY)
            sent_before = len(traffic.sent)
            started = time.monotonic()
            code, out, errs = await _canary(settings, 50, timeout=240)
            decided_s = time.monotonic() - started
            decided_after = len(traffic.sent) - sent_before
            assert code == 0, f"canary --auto exit {code}:\n{errs[-3000:]}"
            await asyncio.sleep(4)  # requests keep flowing while the workers switch
            after_switch = len(traffic.sent)
            await asyncio.sleep(3)
            await traffic.stop()
            results = await asyncio.gather(
                *(client.result(rid, timeout=120) for rid in traffic.sent[after_switch:])
            )
    finally:
        inference.stop()
        metrics.stop()

    # Nothing lost, nothing doubled: one result (or dead letter) per request on the topics.
    answered = await read_topic(
        settings,
        settings.results_topic,
        timeout=60,
        until=lambda rs: len({r["request_id"] for r in rs}) >= len(traffic.sent),
    )
    await asyncio.sleep(2)
    answered = await read_topic(settings, settings.results_topic, timeout=5, until=lambda _: False)
    dead = await read_topic(settings, settings.dlq_topic, timeout=3, until=lambda _: False)
    per_id = Counter(r["request_id"] for r in answered + dead)
    assert all(per_id[rid] == 1 for rid in traffic.sent), "lost or doubled during the canary"

    commands = await read_topic(
        settings, settings.control_topic, timeout=5, until=lambda rs: len(rs) >= 3
    )
    log = await read_rollout(settings.kafka_bootstrap, settings.control_topic, AvroCodec.default())
    lines: list[str] = []  # what `sluice tail llm.control -b --no-follow` prints
    await tail(
        settings.kafka_bootstrap,
        settings.control_topic,
        AvroCodec.default(),
        lambda entry: lines.append(format_line(entry)),
        from_beginning=True,
        follow=False,
        idle_exit_s=1.0,
    )
    shown = json.loads(lines[-1])["value"]["evidence"]
    assert shown == json.loads(commands[-1]["evidence"]), "tail shows the evidence as JSON"
    return {
        "decision": commands[-1],
        "commands": [c["command"] for c in commands],
        "state": log.state,
        "stdout": out,
        "after_switch": results,
        "requests": decided_after,
        "seconds": decided_s,
    }


def _settings(settings_factory, tmp_path: Path) -> Settings:  # type: ignore[no-untyped-def]
    registry_dir = tmp_path / "registry"
    _register(registry_dir, tmp_path)
    return settings_factory(
        backend="benchmark",
        registry_dir=registry_dir,
        benchmark_delay_ms=20,
        benchmark_broken_versions=BAD,
        benchmark_broken_answer="empty",
        metrics_window_s=2,
        metrics_rollup_s=0,
        metrics_lateness_s=1,
        canary_poll_s=2,
        canary_timeout_s=200,
        partitions=2,
    )


def _evidence(decision: dict, stdout: str) -> dict:
    assert decision["issued_by"].startswith("canary-auto:")
    evidence = json.loads(decision["evidence"])
    for arm in ("candidate", "base"):
        for key in ("requests", "windows", "bad_rate", "p99_ms", "feedback_mean", "drifted"):
            assert key in evidence[arm], (arm, key)
    assert {"bad_answers", "latency", "feedback", "drift"} <= set(evidence["checks"])
    assert {"lower", "upper", "estimate", "margin"} <= set(evidence["checks"]["bad_answers"])
    assert evidence["policy"]["error_margin"] == 0.02 and evidence["reason"]
    printed = [line for line in stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in printed] == [evidence], "the CLI prints what it sent"
    return evidence


async def test_good_candidate_is_promoted(settings_factory, tmp_path: Path) -> None:
    settings = _settings(settings_factory, tmp_path)
    outcome = await _scenario(settings, tmp_path, GOOD)
    decision = outcome["decision"]
    assert outcome["commands"] == ["LOAD", "CANARY", "PROMOTE"]
    evidence = _evidence(decision, outcome["stdout"])
    assert evidence["verdict"] == "PROMOTE" and evidence["candidate"]["version"] == GOOD
    assert evidence["candidate"]["requests"] >= settings.canary_min_requests
    assert outcome["state"] == RolloutState(current=GOOD, previous=(None,))
    assert {r["model_version"] for r in outcome["after_switch"]} == {GOOD}
    print(
        f"PROMOTE after {outcome['requests']} requests in {outcome['seconds']:.1f}s "
        f"(candidate {evidence['candidate']['requests']} results)"
    )


async def test_broken_candidate_is_rolled_back(settings_factory, tmp_path: Path) -> None:
    settings = _settings(settings_factory, tmp_path)
    outcome = await _scenario(settings, tmp_path, BAD)
    decision = outcome["decision"]
    assert outcome["commands"] == ["LOAD", "CANARY", "ROLLBACK"]
    evidence = _evidence(decision, outcome["stdout"])
    assert evidence["verdict"] == "ROLLBACK" and evidence["candidate"]["version"] == BAD
    assert evidence["reason"].startswith("regression: bad answers")
    assert evidence["checks"]["bad_answers"]["lower"] > 0
    assert outcome["state"] == RolloutState()
    assert all(r["status"] == "OK" for r in outcome["after_switch"])
    assert BAD not in {r["model_version"] for r in outcome["after_switch"]}
    print(
        f"ROLLBACK after {outcome['requests']} requests in {outcome['seconds']:.1f}s "
        f"(candidate {evidence['candidate']['requests']} results)"
    )
