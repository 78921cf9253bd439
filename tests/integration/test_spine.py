"""The spine on real parts: Apache Kafka broker, Faust worker process, SmolLM2 on CPU."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest

from connectors.client import SluiceClient
from schemas.codec import AvroCodec
from streams.topics import ensure_topics
from tests.integration.helpers import produce_raw, read_topic, start_worker
from tests.integration.test_faults import _assert_committed_to_the_end

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    "What is the capital of France?",
    "Name a color.",
    "What is 2 plus 3?",
    "Say hello.",
    "Name an animal.",
]


def _distinct(records: list[dict]) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_id[r["request_id"]].append(r)
    return by_id


async def _publish_many(client: SluiceClient, n: int, max_new_tokens: int) -> list[str]:
    ids = []
    for i in range(n):
        record = client.build_request(
            f"{PROMPTS[i % len(PROMPTS)]} (#{i})", max_new_tokens=max_new_tokens
        )
        await client.publish_record(record, wait=False)
        ids.append(record["request_id"])
    await client.flush()
    return ids


async def test_200_prompts_get_200_results(settings_factory, model_dir, tmp_path: Path):
    settings = settings_factory(batch_max_size=32)
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = start_worker(settings, tmp_path)
    try:
        async with SluiceClient(settings) as client:
            ids = await _publish_many(client, 200, max_new_tokens=8)
        results = await read_topic(
            settings,
            settings.results_topic,
            timeout=600,
            until=lambda rs: len({r["request_id"] for r in rs}) >= 200,
        )
        metrics = _scrape_metrics(worker.log_file)
    finally:
        worker.stop()
    by_id = _distinct(results)
    assert set(by_id) == set(ids)
    assert all(len(v) == 1 for v in by_id.values()), "a request was answered twice"
    assert all(v[0]["status"] == "OK" for v in by_id.values())
    assert all(v[0]["text"].strip() for v in by_id.values()), "empty answer"
    assert all(v[0]["_key"] == k.encode() for k, v in by_id.items()), "results keyed by id"
    assert max(v[0]["batch_size"] for v in by_id.values()) > 1, "nothing was batched"
    ok = re.search(r'sluice_requests_total\{model="[^"]+",status="OK"\} (\S+)', metrics)
    assert ok and float(ok.group(1)) == 200.0, "Prometheus counter disagrees with the topic"
    assert 'sluice_request_latency_seconds_count{stage="inference"} 200.0' in metrics


def _scrape_metrics(log_file: Path) -> str:
    """The worker logs its metrics address (port 0 = a free port); scrape it."""
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log_file.read_text())
    assert match, "worker did not log its metrics address"
    with urllib.request.urlopen(match.group(1), timeout=10) as response:
        return response.read().decode()


async def test_bad_input_goes_to_the_dlq_and_the_worker_keeps_going(
    settings_factory, model_dir, tmp_path: Path
):
    settings = settings_factory(max_prompt_chars=2000, max_prompt_tokens=256)
    await ensure_topics(settings, settings.kafka_bootstrap)
    codec = AvroCodec.default()
    worker = start_worker(settings, tmp_path)
    try:
        async with SluiceClient(settings) as client:
            base = client.build_request("hello")

            def req(rid: str, **changes: object) -> bytes:
                record = {**base, "request_id": rid, **changes}
                return codec.encode("InferenceRequest", record)

            def sampling(**changes: object) -> dict:
                return {**base["sampling"], **changes}

            feedback = codec.encode("FeedbackEvent", {"request_id": "x", "score": 1})
            missing = codec.header("InferenceRequest") + b"\x02"  # a body cut short
            bad = [
                (b"bytes", b"not avro at all", "undecodable"),
                (b"id", b"\x00\x7f\xff\xff\xfe" + b"\x00" * 8, "unknown_schema"),
                (b"wrong", feedback, "wrong_schema"),
                (b"missing", missing, "undecodable"),
                (b"long", req("long", prompt="x" * 2001), "prompt_too_long"),
                (b"tokens", req("tokens", prompt="word " * 400), "prompt_too_long"),
                (b"model", req("model", model="gpt-17"), "unknown_model"),
                (b"temp", req("temp", sampling=sampling(temperature=-1.0)), "bad_sampling"),
                (b"topp", req("topp", sampling=sampling(top_p=0.0)), "bad_sampling"),
                (b"maxnew", req("maxnew", sampling=sampling(max_new_tokens=0)), "bad_sampling"),
                (b"empty", req("empty", prompt="   "), "invalid_request"),
            ]
            await produce_raw(settings, [(k, v) for k, v, _ in bad])
            expired = client.build_request("Too late.", deadline_ms=1)
            expired["created_at"] -= 60_000  # published a minute "ago" with a 1 ms budget
            await client.publish_record(expired)
            good = await client.publish("Name a fruit.", max_new_tokens=8)
            result = await client.result(good, timeout=120)
            late = await client.result(expired["request_id"], timeout=60)
        assert result["status"] == "OK" and result["text"].strip()
        assert late["status"] == "EXPIRED" and late["finish_reason"] == "expired"
        assert late["text"] == "" and late["completion_tokens"] == 0
        dlq = await read_topic(
            settings, settings.dlq_topic, timeout=60, until=lambda rs: len(rs) >= len(bad)
        )
        await asyncio.sleep(1.0)  # nothing more should arrive
        dlq = await read_topic(settings, settings.dlq_topic, timeout=5, until=lambda rs: False)
    finally:
        worker.stop()
    assert len(dlq) == len(bad), [d["reason"] for d in dlq]
    by_key = {d["original_key"]: d for d in dlq}
    for key, value, code in bad:
        letter = by_key[key]
        assert letter["reason_code"] == code, (key, letter["reason"])
        assert letter["reason"]
        assert letter["original_value"] == value
        assert letter["source_topic"] == settings.requests_topic
        assert letter["source_offset"] >= 0
    # an orderly exit: SIGTERM is handled (drain, commit), not fatal (-15)
    assert worker.proc is not None and worker.proc.returncode == 0


async def test_sigkill_halfway_loses_nothing(settings_factory, model_dir, tmp_path: Path):
    settings = settings_factory(batch_max_size=16, commit_interval_ms=100)
    await ensure_topics(settings, settings.kafka_bootstrap)
    worker = start_worker(settings, tmp_path, "first")
    try:
        async with SluiceClient(settings) as client:
            ids = await _publish_many(client, 200, max_new_tokens=8)
        half = await read_topic(
            settings,
            settings.results_topic,
            timeout=600,
            until=lambda rs: len(rs) >= 100,
        )
        assert len(half) >= 100
        worker.kill()  # SIGKILL: no drain, no final commit
        worker = start_worker(settings, tmp_path, "second")
        results = await read_topic(
            settings,
            settings.results_topic,
            timeout=600,
            until=lambda rs: len({r["request_id"] for r in rs}) >= 200,
        )
    finally:
        worker.stop()
    by_id = _distinct(results)
    assert set(by_id) == set(ids), f"{len(set(ids) - set(by_id))} requests lost"
    for rid, answers in by_id.items():
        assert len({a["text"] for a in answers}) == 1, f"{rid} answered differently"
    workers = {r["worker"] for r in results}
    assert len(workers) == 2, "both workers should have answered some requests"
    # and the group's offsets reach the end: nothing is left to be read again
    await _assert_committed_to_the_end(settings)
