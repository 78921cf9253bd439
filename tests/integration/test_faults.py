"""Nothing lost under faults, on the real broker with several worker processes.

Each test drives workers from outside, as production would hurt them: SIGKILL, SIGTERM,
workers joining mid-stream, the broker killed and restarted, a broker that is gone at
shutdown, a dead or overloaded engine, records too large to publish. The engine is the
benchmark one (its answer is a digest of the prompt, so a result given to the wrong request
shows). Every test checks every request has an answer (a result, or a dead letter with a
reason), that answers have the right content, and that the group's committed offsets end at
the end of each partition. The figures each test measured are printed in one line starting
with ``FAULTS`` (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from connectors.client import SluiceClient
from connectors.processes import WorkerProcess
from deploy.local_kafka import LocalKafka, default_cache_dir
from inference.backends.benchmark import BenchmarkEngine
from inference.types import GenerationRequest, Sampling
from streams.kafka_clients import stop_consumer
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.integration.helpers import read_topic, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_NEW = 4


def _expected_text(prompt: str, completion_tokens: int = 16) -> str:
    engine = BenchmarkEngine(completion_tokens=completion_tokens)
    return engine.text_for(GenerationRequest("x", prompt, Sampling(max_new_tokens=MAX_NEW)))


async def _publish(client: SluiceClient, prompts: dict[str, str], n: int, tag: str) -> None:
    for i in range(n):
        prompt = f"{tag} prompt number {i}"
        record = client.build_request(prompt, max_new_tokens=MAX_NEW)
        prompts[record["request_id"]] = prompt
        while True:
            try:
                await client.publish_record(record, wait=False)
                break
            except Exception:  # the broker is restarting: a producer retries
                await asyncio.sleep(0.5)
    await client.flush()


async def _answers(
    settings: Settings, ids: set[str], timeout: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """Results and dead letters until every id in ``ids`` has one (or ``timeout``)."""
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    letters: list[dict[str, Any]] = []
    give_up = started + timeout
    while time.monotonic() < give_up:
        results = await read_topic(
            settings, settings.results_topic, timeout=15, until=lambda rs: False
        )
        letters = await read_topic(settings, settings.dlq_topic, timeout=3, until=lambda rs: False)
        seen = {r["request_id"] for r in results} | {d["request_id"] for d in letters}
        if ids <= seen:
            break
    return results, letters, time.monotonic() - started


async def _offsets(settings: Settings) -> tuple[dict[int, int], dict[int, int]]:
    """(group's committed offsets, end offsets) of the requests topic, by partition."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(settings.app_id)
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.requests_topic, p) for p in range(settings.partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await stop_consumer(consumer)
    return (
        {
            tp.partition: meta.offset
            for tp, meta in committed.items()
            if tp.topic == settings.requests_topic
        },
        {tp.partition: end for tp, end in ends.items()},
    )


async def _assert_committed_to_the_end(settings: Settings, timeout: float = 30.0) -> None:
    committed: dict[int, int] = {}
    ends: dict[int, int] = {}
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        committed, ends = await _offsets(settings)
        if all(committed.get(p, 0) == end for p, end in ends.items()):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"committed {committed} != end offsets {ends}")


def _check(
    prompts: dict[str, str], results: list[dict[str, Any]], letters: list[dict[str, Any]]
) -> dict[str, int]:
    """Every request answered, with its own content. Returns the counts for the report."""
    answered = {r["request_id"] for r in results} | {d["request_id"] for d in letters}
    missing = set(prompts) - answered
    assert not missing, f"{len(missing)} of {len(prompts)} requests never answered"
    for r in results:
        assert r["status"] == "OK", r
        assert r["text"] == _expected_text(prompts[r["request_id"]]), "a mixed-up answer"
    per_id = Counter(r["request_id"] for r in results)
    return {
        "requests": len(prompts),
        "answered": len(answered & set(prompts)),
        "missing": len(missing),
        "duplicates": sum(n - 1 for n in per_id.values()),
        "dead_letters": len(letters),
    }


async def _start(settings: Settings, log_dir: Path, name: str) -> WorkerProcess:
    return await asyncio.to_thread(start_worker, settings, log_dir, name)


async def _stop(worker: WorkerProcess, timeout: float = 90.0) -> tuple[int | None, float]:
    started = time.monotonic()
    code = await asyncio.to_thread(worker.stop, timeout)
    return code, time.monotonic() - started


def _fault_settings(settings_factory: Any, **overrides: Any) -> Settings:
    fields: dict[str, Any] = dict(
        backend="benchmark",
        model_name="benchmark",
        benchmark_delay_ms=20,
        commit_interval_ms=100,
        worker_role="inference",
        drain_timeout_s=10,
        shutdown_grace_s=30,
        batch_max_size=32,
    )
    fields.update(overrides)
    return settings_factory(**fields)


async def test_three_workers_killed_stopped_and_joined_mid_stream_lose_nothing(
    settings_factory, tmp_path: Path
) -> None:
    settings = _fault_settings(settings_factory, partitions=6)
    await ensure_topics(settings, settings.kafka_bootstrap)
    workers = [await _start(settings, tmp_path, f"w{i}") for i in range(3)]
    prompts: dict[str, str] = {}
    started = time.monotonic()
    try:
        async with SluiceClient(settings) as client:
            publishing = asyncio.create_task(_publish_slowly(client, prompts, 3000))
            await _wait_for(lambda: len(prompts) >= 1000)
            workers[0].kill()  # SIGKILL: no drain, no final commit
            await _wait_for(lambda: len(prompts) >= 1500)
            code, term_s = await _stop(workers[1])  # SIGTERM mid-stream
            assert code == 0, workers[1].log_tail(30)
            joining = [_start(settings, tmp_path, f"w{i}") for i in (3, 4)]
            workers += list(await asyncio.gather(*joining))
            await publishing
        results, letters, _ = await _answers(settings, set(prompts), timeout=300)
        full_s = time.monotonic() - started
        counts = _check(prompts, results, letters)
        await _assert_committed_to_the_end(settings)
    finally:
        for worker in workers:
            worker.stop(30)
    print(
        f"\nFAULTS multi-worker: {counts}, all answered {full_s:.1f} s after the first "
        f"publish; SIGTERM'd worker exited in {term_s:.1f} s"
    )


async def _publish_slowly(client: SluiceClient, prompts: dict[str, str], n: int) -> None:
    for chunk in range(n // 100):
        await _publish(client, prompts, 100, f"c{chunk}")
        await asyncio.sleep(0.3)


async def _wait_for(condition: Any, timeout: float = 120.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "timed out"
        await asyncio.sleep(0.05)


async def test_broker_restart_and_broker_gone(settings_factory, tmp_path: Path) -> None:
    """kill -9 of the broker while requests flow, restarted on the same port and data: the
    workers recover by themselves and nothing is lost. Then the broker goes for good: a
    SIGTERM'd worker exits within its grace, and its log stays small."""
    kafka = LocalKafka(tmp_path / "broker-home", cache_dir=default_cache_dir())
    info = kafka.up()
    workers: list[WorkerProcess] = []
    try:
        settings = _fault_settings(
            settings_factory, kafka_bootstrap=info.bootstrap, shutdown_grace_s=20
        )
        await ensure_topics(settings, settings.kafka_bootstrap)
        workers = [await _start(settings, tmp_path, f"b{i}") for i in range(2)]
        prompts: dict[str, str] = {}
        started = time.monotonic()
        async with SluiceClient(settings) as client:
            publishing = asyncio.create_task(_publish_slowly(client, prompts, 1500))
            await _wait_for(lambda: len(prompts) >= 500)
            os.kill(info.pid, signal.SIGKILL)
            await asyncio.sleep(3)
            info = await asyncio.to_thread(kafka.up)
            assert info.bootstrap == settings.kafka_bootstrap, "the broker moved"
            await publishing
        results, letters, _ = await _answers(settings, set(prompts), timeout=300)
        full_s = time.monotonic() - started
        counts = _check(prompts, results, letters)
        await _assert_committed_to_the_end(settings, timeout=60)
        assert all(w.alive() for w in workers), "a worker needed a restart of its own"
        print(
            f"\nFAULTS broker restart: {counts}, all answered {full_s:.1f} s after the "
            "first publish"
        )

        # The broker goes away for good; then the orchestrator stops the worker.
        before = workers[0].log_file.stat().st_size
        os.kill(info.pid, signal.SIGKILL)
        await asyncio.sleep(10)
        code, exit_s = await _stop(workers[0], timeout=60)
        grown = workers[0].log_file.stat().st_size - before
        lines = workers[0].log_file.read_bytes()[before:].count(b"\n")
        assert exit_s <= settings.shutdown_grace_s + 5, exit_s
        assert lines < 300, f"{lines} log lines in {exit_s + 10:.0f} s with the broker gone"
        print(
            f"FAULTS broker gone: SIGTERM exit in {exit_s:.1f} s (code {code}); "
            f"{lines} log lines ({grown} bytes) in the {exit_s + 10:.0f} s since it went"
        )
    finally:
        for worker in workers:
            worker.kill()
        kafka.down()


async def test_records_too_large_are_dead_lettered_and_commits_move_on(
    settings_factory, tmp_path: Path
) -> None:
    settings = _fault_settings(
        settings_factory,
        partitions=1,
        max_new_tokens_limit=100_000,
        max_prompt_tokens=100_000,
        batch_max_tokens=200_000,
        benchmark_completion_tokens=70_000,  # 70,000 words of 17 bytes: a 1.2 MB result
    )
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = await _start(settings, tmp_path, "big")
    try:
        async with SluiceClient(settings) as client:
            huge = client.build_request("x" * 1_000_000, max_new_tokens=4)
            await client.publish_record(huge)
            wordy = client.build_request("a long answer, please", max_new_tokens=70_000)
            await client.publish_record(wordy)
            fine = client.build_request("a short one", max_new_tokens=4)
            await client.publish_record(fine)
        ids = {huge["request_id"], wordy["request_id"], fine["request_id"]}
        results, letters, _ = await _answers(settings, ids, timeout=120)
        await _assert_committed_to_the_end(settings)
    finally:
        code, _ = await _stop(worker)
    by_id = {d["request_id"]: d for d in letters}
    too_long = by_id[huge["request_id"]]
    assert too_long["reason_code"] == "prompt_too_long"
    assert too_long["original_truncated"] is True
    assert too_long["original_size"] > 1_000_000
    assert len(too_long["original_value"]) <= settings.dlq_max_original_bytes
    assert too_long["original_sha256"] and len(too_long["original_sha256"]) == 64
    unpublishable = by_id[wordy["request_id"]]
    assert unpublishable["reason_code"] == "result_undeliverable", unpublishable["reason"]
    assert (
        hashlib.sha256(unpublishable["original_value"]).hexdigest()
        == (unpublishable["original_sha256"])
    )
    assert [r["request_id"] for r in results] == [fine["request_id"]]
    assert code == 0


async def test_a_dead_engine_stops_the_worker_and_commits_no_errors(
    settings_factory, tmp_path: Path
) -> None:
    dying = _fault_settings(settings_factory, partitions=2, benchmark_dead_after=30)
    await ensure_topics(dying, dying.kafka_bootstrap)
    worker = await _start(dying, tmp_path, "dying")
    prompts: dict[str, str] = {}
    async with SluiceClient(dying) as client:
        await _publish(client, prompts, 200, "dead")
    exited = await asyncio.to_thread(_wait_exit, worker, 60)
    assert exited == 3, f"exit code {exited}:\n{worker.log_tail(30)}"
    results = await read_topic(dying, dying.results_topic, timeout=5, until=lambda rs: False)
    assert all(r["status"] == "OK" for r in results), "an ERROR result was published"
    committed, _ = await _offsets(dying)
    assert sum(committed.values()) <= len(results) <= 30
    healthy = dying.model_copy(update={"benchmark_dead_after": None})
    worker = await _start(healthy, tmp_path, "healthy")
    try:
        results, letters, _ = await _answers(healthy, set(prompts), timeout=120)
        counts = _check(prompts, results, letters)
        await _assert_committed_to_the_end(healthy)
    finally:
        worker.stop(30)
    print(
        f"\nFAULTS dead engine: exit code 3 after {sum(committed.values())} committed; "
        f"after restart {counts}"
    )


def _wait_exit(worker: WorkerProcess, timeout: float) -> int | None:
    assert worker.proc is not None
    try:
        return worker.proc.wait(timeout=timeout)
    except Exception:
        worker.kill()
        return None


async def test_an_overloaded_engine_is_retried_until_it_answers(
    settings_factory, tmp_path: Path
) -> None:
    settings = _fault_settings(settings_factory, partitions=2, benchmark_overloaded_s=6)
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = await _start(settings, tmp_path, "busy")
    prompts: dict[str, str] = {}
    try:
        async with SluiceClient(settings) as client:
            await _publish(client, prompts, 50, "busy")
        results, letters, _ = await _answers(settings, set(prompts), timeout=120)
        counts = _check(prompts, results, letters)
        assert not letters
        await _assert_committed_to_the_end(settings)
    finally:
        worker.stop(30)
    assert "engine could not take" in worker.log_file.read_text(), "never overloaded?"
    print(f"\nFAULTS overloaded engine: {counts}")


async def test_sigterm_at_saturation_exits_within_the_grace(
    settings_factory, tmp_path: Path
) -> None:
    settings = _fault_settings(
        settings_factory,
        partitions=2,
        benchmark_delay_ms=3000,
        max_inflight=64,
        drain_timeout_s=2,
        shutdown_grace_s=20,
    )
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = await _start(settings, tmp_path, "saturated")
    prompts: dict[str, str] = {}
    async with SluiceClient(settings) as client:
        await _publish(client, prompts, 600, "sat")
    await asyncio.sleep(4)  # the first batches are answered, the pipeline is full
    code, exit_s = await _stop(worker, timeout=60)
    assert code == 0, worker.log_tail(40)
    assert exit_s <= settings.shutdown_grace_s, exit_s
    fast = settings.model_copy(update={"benchmark_delay_ms": 5})
    worker = await _start(fast, tmp_path, "after")
    try:
        results, letters, _ = await _answers(fast, set(prompts), timeout=120)
        counts = _check(prompts, results, letters)
        await _assert_committed_to_the_end(fast)
    finally:
        worker.stop(30)
    print(f"\nFAULTS SIGTERM at saturation: exit in {exit_s:.1f} s (code {code}); {counts}")
