"""The whole loop on the real broker and the real model, while requests keep flowing:

requests → results → feedback → training examples → replay to a file → retrain → gate →
register → LOAD + canary 20% (both versions answer, in about that share) → promote →
rollback; every request gets exactly one result throughout.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from connectors.client import SluiceClient
from connectors.replay import replay
from inference.registry import ModelRegistry
from inference.retrain import gate, retrain
from streams.rollout import canary_bucket
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CITIES = [
    "Paris",
    "Rome",
    "Oslo",
    "Lima",
    "Cairo",
    "Tokyo",
    "Quito",
    "Bern",
    "Dakar",
    "Hanoi",
    "Riga",
    "Sofia",
    "Minsk",
    "Seoul",
    "Kyiv",
    "Accra",
    "Doha",
    "Baku",
    "Male",
    "Suva",
    "Apia",
    "Lome",
    "Juba",
    "Bamako",
]


class Stream:
    """A steady stream of requests in the background; remembers what it published."""

    def __init__(self, client: SluiceClient, interval: float) -> None:
        self.client, self.interval = client, interval
        self.sent: list[tuple[str, float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        i = 0
        while True:
            rid = await self.client.publish(f"Say a word. ({i})", max_new_tokens=3)
            self.sent.append((rid, time.monotonic()))
            i += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _results_for(client: SluiceClient, ids: list[str]) -> dict[str, dict]:
    return dict(
        zip(ids, await asyncio.gather(*(client.result(i, timeout=300) for i in ids)), strict=True)
    )


async def _wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if predicate():
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def test_feedback_to_new_model_and_rollout(settings_factory, model_dir, tmp_path: Path):
    registry_dir = tmp_path / "registry"
    settings = settings_factory(
        registry_dir=registry_dir, batch_max_size=16, feedback_wait_ms=5_000
    )
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = start_worker(settings, tmp_path)
    try:
        async with SluiceClient(settings) as client:
            # 1. Requests and results; 2. feedback with a consistent correction to learn.
            ids = [
                await client.publish(
                    f"What is the capital city in my list, item {c}?", max_new_tokens=8
                )
                for c in CITIES
            ]
            answers = await _results_for(client, ids)
            assert all(a["status"] == "OK" for a in answers.values())
            base_version = answers[ids[0]]["model_version"]
            for rid, city in zip(ids, CITIES, strict=True):
                await client.send_feedback(
                    rid, -1, correction=f"The answer is {city}.", user="tester-1"
                )
            await client.send_feedback("no-such-request", 1)  # bad: unknown request
            await client.send_feedback(ids[0], 1, label="x" * 3)  # a second judgement

            # 3. Training examples appear on their topic.
            examples = await read_topic(
                settings,
                settings.training_topic,
                timeout=120,
                until=lambda rs: len({r["request_id"] for r in rs}) >= len(ids),
            )
            assert {r["request_id"] for r in examples} == set(ids)
            assert all(
                r["correction"].startswith("The answer is") for r in examples if r["score"] == -1
            )

            # 4. Replay to a file (deduplicated by request_id: the last judgement wins).
            dataset = tmp_path / "examples.jsonl"
            summary = await replay(settings.kafka_bootstrap, settings.training_topic, dataset)
            assert summary.written == len(ids) and summary.skipped_duplicates >= 1

            # 5. Retrain, gate, register.
            started = time.monotonic()
            report = await asyncio.to_thread(
                retrain, dataset, model_dir, tmp_path / "new", epochs=3, seed=0
            )
            retrain_s = time.monotonic() - started
            gate(report)  # raises GateRefused if the new model is not better
            print(
                f"retrain {retrain_s:.1f}s; held-out NLL {report.base_heldout_nll:.3f} -> "
                f"{report.new_heldout_nll:.3f}"
            )
            registry = ModelRegistry(registry_dir)
            version = registry.register(tmp_path / "new")
            assert version != base_version

            # 6. Rollout while a stream of requests keeps flowing.
            stream = Stream(client, interval=0.15)
            stream.start()
            await asyncio.sleep(2)
            await client.send_control("LOAD", model=settings.model_name, version=version)
            await client.send_control("CANARY", model=settings.model_name, percent=20)
            canary_from = time.monotonic()
            seen: dict[str, dict] = {}

            async def collect() -> None:
                async for result in client.results():
                    seen[result["request_id"]] = result

            collector = asyncio.create_task(collect())
            await _wait_until(
                lambda: any(r["model_version"] == version for r in seen.values()),
                120,
                "the candidate to answer",
            )
            await asyncio.sleep(12)
            await client.send_control("PROMOTE", model=settings.model_name)
            promote_at = time.monotonic()
            await asyncio.sleep(8)
            await client.send_control("ROLLBACK", model=settings.model_name)
            rollback_at = time.monotonic()
            await asyncio.sleep(8)
            await stream.stop()
            final = await _results_for(client, [rid for rid, _ in stream.sent])
            collector.cancel()
    finally:
        worker.stop()

    # Exactly one result per request, on the topic itself (not just in the client).
    expected = len(stream.sent) + len(ids)
    everything = await read_topic(
        settings, settings.results_topic, timeout=60, until=lambda rs: len(rs) >= expected
    )
    await asyncio.sleep(2)  # anything doubled would have arrived by now
    everything = await read_topic(
        settings, settings.results_topic, timeout=10, until=lambda rs: False
    )
    per_id = Counter(r["request_id"] for r in everything)
    assert all(per_id[rid] == 1 for rid, _ in stream.sent), "lost or doubled during a switch"
    assert all(per_id[rid] == 1 for rid in ids)

    # Canary phase: requests whose bucket is under 20 went to the candidate.
    def phase(lo: float, hi: float) -> list[tuple[str, dict]]:
        return [(rid, final[rid]) for rid, t in stream.sent if lo + 3 <= t < hi - 1]

    canary = phase(canary_from, promote_at)
    on_candidate = [rid for rid, r in canary if r["model_version"] == version]
    share = len(on_candidate) / len(canary)
    assert {r["model_version"] for _, r in canary} == {base_version, version}
    assert 0.05 <= share <= 0.40, f"canary share {share:.2f}"
    assert all(canary_bucket(rid) < 20 for rid in on_candidate)
    assert {r["model_version"] for _, r in phase(promote_at, rollback_at)} == {version}
    assert {r["model_version"] for _, r in phase(rollback_at, time.monotonic() + 99)} == {
        base_version
    }
    dlq = await read_topic(
        settings, settings.feedback_dlq_topic, timeout=60, until=lambda rs: len(rs) >= 1
    )
    assert [d["reason_code"] for d in dlq] == ["unknown_request"]
