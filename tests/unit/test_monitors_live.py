"""The monitors inside the metrics job: de-duplication and budget of prompts, tenants from
requests, quality and cost fields of MetricsWindow, drift readings at close, the job's
monitor step and per-version persistence, the tenant cost counters, the MetricsWindow
schema's previous version. Kafka and the embedder are faked (pure logic); the codec is real.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import schemas
from schemas import AvroCodec, SchemaCatalog
from streams.metrics_windows.aggregator import Source, WindowAggregator
from streams.metrics_windows.cost import OTHER, UNKNOWN, CostCounters, TenantLabels
from streams.metrics_windows.job import MetricsJob, state_topic
from streams.metrics_windows.monitoring import (
    LiveMonitors,
    latest_quality,
    monitor_key,
    parse_monitor_key,
)
from streams.metrics_windows.window import engine_seconds
from streams.monitors.drift import DriftConfig, Reference, prompt_key
from streams.monitors.monitor_set import MonitorSet
from streams.records import SourceRecord
from streams.settings import Settings
from tests.unit.test_metrics_windows import BASE, FakeClock, aggregator, by_id, result


class TopicEmbedder:
    """Deterministic 8-d vectors: prompts starting "code" sit around one point, the rest
    around another; each text gets its own small offset (from its hash)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
            noise = np.random.default_rng(seed).normal(0, 1, 8)
            centre = np.full(8, 3.0 if text.startswith("code") else 0.0)
            rows.append(centre + noise)
        return np.asarray(rows, dtype=np.float32)


def ok(rid: str, version: str = "v1", **extra: Any) -> dict[str, Any]:
    return {
        "request_id": rid,
        "status": "OK",
        "model": "m",
        "model_version": version,
        "completion_tokens": 5,
    } | extra


# -- MonitorSet: de-duplication and the per-window budget -----------------------------------
def test_a_replayed_prompt_set_is_not_a_new_sample() -> None:
    config = DriftConfig(reference_size=20, current_size=20, min_current=5, permutations=50)
    monitors = MonitorSet(config, TopicEmbedder(), embed_batch=100)
    prompts = [f"question {i}" for i in range(20)]
    for round_ in range(3):  # the reference, then the same prompts replayed twice
        for i, prompt in enumerate(prompts):
            rid = f"{round_}-{i}"
            # case and whitespace do not make a prompt new
            monitors.add_request(
                {"request_id": rid, "prompt": prompt.upper() if round_ else prompt}
            )
            monitors.add_result(ok(rid))
        monitors.embed_pending()
    reading = monitors.reading("m", "v1")
    assert (reading.reference_prompts, reading.current_prompts) == (20, 0)
    assert monitors.counts["prompt_duplicate"] == 40
    assert reading.prompt_p_value is None  # no current sample: no reading, not "no drift"
    # one prompt repeated in the current sample counts once
    for i in range(10):
        monitors.add_request({"request_id": f"x{i}", "prompt": "  same   prompt "})
        monitors.add_result(ok(f"x{i}"))
    monitors.embed_pending()
    assert monitors.reading("m", "v1").current_prompts == 1
    assert prompt_key("Same Prompt") == prompt_key(" same\tprompt")


def test_prompts_are_budgeted_per_version_and_window() -> None:
    config = DriftConfig(reference_size=2, current_size=50, min_current=2)
    monitors = MonitorSet(config, TopicEmbedder(), embed_batch=100, per_window=3)
    for i in range(10):
        for version in ("v1", "v2"):
            rid = f"{version}-{i}"
            monitors.add_request({"request_id": rid, "prompt": f"p {rid}"})
            monitors.add_result(ok(rid, version), slot=i // 5)  # two windows of 5
    assert monitors.embed_pending() == 2 * 2 * 3
    assert monitors.counts["prompt_over_budget"] == 2 * 2 * 2


def test_take_pending_and_add_embeddings_let_the_caller_embed_elsewhere() -> None:
    config = DriftConfig(reference_size=2, current_size=5, min_current=2)
    embedder = TopicEmbedder()
    monitors = MonitorSet(config, embedder)
    for i in range(3):
        monitors.add_request({"request_id": f"r{i}", "prompt": f"p{i}"})
        monitors.add_result(ok(f"r{i}"))
    batch = monitors.take_pending()
    # meanwhile the same prompt comes again: not queued twice
    monitors.add_request({"request_id": "again", "prompt": "p0"})
    monitors.add_result(ok("again"))
    assert monitors.take_pending() == []
    monitors.add_embeddings(batch, embedder.embed([p for _, _, p in batch]))
    reading = monitors.reading("m", "v1")
    assert (reading.reference_prompts, reading.current_prompts) == (2, 1)
    # a failed embedding drops its prompts, counted
    monitors.add_request({"request_id": "r9", "prompt": "p9"})
    monitors.add_result(ok("r9"))
    monitors.add_embeddings(monitors.take_pending(), None)
    assert monitors.counts["prompt_embed_failed"] == 1
    # per-version state round-trips, with the seen prompts
    copy_ = MonitorSet(config, embedder)
    copy_.restore_version("m", "v1", json.loads(json.dumps(monitors.version_state("m", "v1"))))
    copy_.add_request({"request_id": "r0b", "prompt": "p0"})
    copy_.add_result(ok("r0b"))
    assert copy_.counts["prompt_duplicate"] == 1


def test_a_pinned_reference_knows_its_prompts() -> None:
    embedder = TopicEmbedder()
    reference = Reference.from_records(
        [{"prompt": "a", "completion_tokens": 3}, {"prompt": "a"}, {"prompt": "b"}],
        embedder.embed,
    )
    assert len(reference.prompts) == 2 and reference.lengths == (3.0,)
    monitors = MonitorSet(
        DriftConfig(reference_size=2, current_size=4, min_current=2), embedder, reference=reference
    )
    monitors.add_request({"request_id": "r", "prompt": "A"})
    monitors.add_result(ok("r"))
    assert monitors.counts["prompt_duplicate"] == 1


# -- the aggregator: tenants from requests, quality and cost per window, annotations ---------
def request(rid: str, tenant: str | None) -> dict[str, Any]:
    return {"request_id": rid, "prompt": f"prompt of {rid}", "tenant": tenant}


def test_results_take_the_tenant_of_their_request() -> None:
    agg, clock = aggregator(rollup_s=0, max_tenants=5)
    agg.add_request(request("a1", "acme"))
    agg.add_request(request("b1", "bolt"))
    agg.add_request(request("n1", None))
    assert agg.add_result(result(BASE + 100, rid="a1"))
    assert agg.add_result(result(BASE + 200, rid="b1", tenant="own"))  # its own field wins
    assert agg.add_result(result(BASE + 300, rid="n1"))
    assert agg.add_result(result(BASE + 400, rid="never-requested"))
    clock.now += 60_000
    agg.advance()
    windows = by_id(agg.outbox)
    assert windows[f"10s:{BASE}:m:v1:acme"]["requests_total"] == 1
    assert windows[f"10s:{BASE}:m:v1:own"]["requests_total"] == 1
    assert windows[f"10s:{BASE}:m:v1:"]["requests_total"] == 2
    assert agg.counts["requests"] == 3


def test_the_request_lookup_is_bounded_and_survives_a_restart() -> None:
    agg, clock = aggregator(rollup_s=0, request_lookup=2)
    for i in range(3):
        agg.add_request(request(f"r{i}", f"t{i}"), Source("req", 0, i))
    state = json.loads(json.dumps(agg.to_state()))
    agg = WindowAggregator.from_state(state, agg.config, clock)
    assert not agg.add_request(request("r2", "t2"), Source("req", 0, 2))  # seen already
    for i in range(3):
        agg.add_result(result(BASE + i, rid=f"r{i}"))
    clock.now += 60_000
    agg.advance()
    tenants = {r["tenant"] for r in agg.outbox}
    assert tenants == {"", "t1", "t2"}  # r0 fell out of the lookup
    # a state written before the lookup existed still loads
    del state["request_tenants"]
    WindowAggregator.from_state(state, agg.config, clock)


def test_a_restart_with_requests_in_the_stream_emits_what_one_run_emits() -> None:
    rng = random.Random(4)
    events: list[tuple[str, dict[str, Any], Source]] = []
    offsets: Counter[str] = Counter()
    t = BASE
    for i in range(1500):
        t += rng.randint(0, 300)
        rid = f"q{i}"
        for topic, record in (
            ("req", request(rid, rng.choice([None, "a", "b", "c"]))),
            ("res", result(t, rid=rid, completion=rng.randint(0, 30))),
        ):
            events.append((topic, record, Source(topic, 0, offsets[topic])))
            offsets[topic] += 1
    rng.shuffle(events[:50])  # a few results before their request

    def feed(agg: WindowAggregator, clock: FakeClock, part: list[Any]) -> None:
        for topic, record, source in part:
            clock.now += 5
            (agg.add_request if topic == "req" else agg.add_result)(record, source)

    single, clock = aggregator(max_tenants=2, request_lookup=50)
    feed(single, clock, events)
    clock.now += 120_000
    single.advance()
    expected = single.outbox

    agg, clock = aggregator(max_tenants=2, request_lookup=50)
    published: list[dict[str, Any]] = []
    i = 0
    while i < len(events):
        step = rng.randint(30, 300)
        feed(agg, clock, events[i : i + step])
        i += step
        out = agg.outbox
        published.extend(out)
        agg.acknowledge(r["window_id"] for r in out)
        agg = WindowAggregator.from_state(json.loads(json.dumps(agg.to_state())), agg.config, clock)
        feed(agg, clock, events[max(0, i - rng.randint(0, 40)) : i])  # re-delivered
    clock.now += 120_000
    agg.advance()
    published.extend(agg.outbox)
    strip = [{k: v for k, v in r.items() if k != "closed_at"} for r in published]
    assert strip == [{k: v for k, v in r.items() if k != "closed_at"} for r in expected]
    assert len({r["tenant"] for r in expected} - {""}) == 2  # tenants from the requests


def test_a_window_carries_quality_counts_and_engine_seconds() -> None:
    agg, clock = aggregator(rollup_s=0)
    texts = [
        ("Paris is the capital.", "stop"),
        ("", "stop"),
        ("I'm sorry, but I can't help with that.", "stop"),
        ("The list goes on and", "length"),  # cut mid-sentence
        ("A full sentence.", "length"),
    ]
    for i, (text, finish) in enumerate(texts):
        agg.add_result(
            result(BASE + i, rid=f"r{i}", total=403.0, batch=4)
            | {"text": text, "finish_reason": finish}
        )
    agg.add_result(result(BASE + 9, rid="e", status="ERROR", total=403.0, batch=4))
    clock.now += 60_000
    agg.advance()
    window = agg.outbox[0]
    assert window["answers"] == 5 and window["requests_total"] == 6
    assert (window["empty_answers"], window["refusals"], window["truncated_answers"]) == (1, 1, 1)
    assert window["length_finishes"] == 2
    assert window["empty_rate"] == window["refusal_rate"] == window["truncated_rate"] == 0.2
    assert window["length_finish_rate"] == 0.4
    # each result's share of its batch: (403 - 3) ms / 4, six results
    assert window["engine_seconds"] == pytest.approx(6 * 0.1)
    assert engine_seconds({"timings": {"inference_ms": 50.0}}) == 0.05  # batch size unknown
    assert window["prompt_drift"] is None and window["prompt_drift_flagged"] is None


def test_annotations_go_on_closed_windows_of_a_model_not_on_corrections() -> None:
    agg, clock = aggregator(rollup_s=0, lateness_s=1)
    agg.annotate = lambda key: {"prompt_drift_p_value": 0.001, "prompt_drift_flagged": True}
    agg.add_result(result(BASE + 100))
    agg.add_dead_letter({"reason_code": "x", "created_at": BASE + 100})
    agg.add_result(result(BASE + 20_000))  # closes the first window
    agg.add_result(result(BASE + 200))  # late: a correction
    clock.now += 60_000
    agg.advance()
    windows = by_id(agg.outbox)
    assert windows[f"10s:{BASE}:m:v1:"]["prompt_drift_flagged"] is True
    assert windows[f"10s:{BASE}:::"]["prompt_drift_flagged"] is None  # no model
    corrections = [w for w in agg.outbox if w["correction"]]
    assert corrections and all(w["prompt_drift_flagged"] is None for w in corrections)


# -- the schema: new optional fields, the previous version still readable --------------------
PREVIOUS = Path(schemas.__file__).parent / "avro" / "previous" / "MetricsWindow.v1.avsc"


def test_new_and_previous_metrics_window_records_read_both_ways() -> None:
    agg, clock = aggregator(rollup_s=0)
    agg.add_result(result(BASE + 1) | {"text": "Hello.", "finish_reason": "stop"})
    clock.now += 60_000
    agg.advance()
    record = agg.outbox[0]
    codec = AvroCodec.default()
    _, decoded = codec.decode(codec.encode("MetricsWindow", record))
    assert decoded == record

    previous_raw = json.loads(PREVIOUS.read_text(encoding="utf-8"))
    old_catalog = SchemaCatalog()
    old_catalog.add(copy.deepcopy(previous_raw))
    old_codec = AvroCodec(old_catalog)
    new_fields = {f["name"] for f in SchemaCatalog.default().raw("MetricsWindow")["fields"]}
    old_fields = {f["name"] for f in previous_raw["fields"]}
    assert old_fields < new_fields
    # a record written by an old job reads with nulls in the new fields
    old_record = {k: v for k, v in record.items() if k in old_fields}
    _, read = codec.decode(old_codec.encode("MetricsWindow", old_record), expected="MetricsWindow")
    assert all(read[name] is None for name in new_fields - old_fields)
    assert read["requests_total"] == 1


# -- cost counters -------------------------------------------------------------------------
def test_tenant_labels_are_bounded_and_sticky() -> None:
    labels = TenantLabels(2)
    assert [labels.label(t) for t in ["a", None, "", "b", "c", "a", "other"]] == [
        "a",
        UNKNOWN,
        UNKNOWN,
        "b",
        OTHER,
        "a",
        OTHER,
    ]
    with pytest.raises(ValueError):
        TenantLabels(-1)


def test_cost_counters_add_tokens_and_engine_seconds_per_tenant() -> None:
    registry = CollectorRegistry()
    cost = CostCounters(registry, top_k=1)
    for tenant in ("big", "small", None):
        cost.add_result(result(BASE, total=203.0, batch=2), tenant)
    labels = {"model": "m", "version": "v1"}
    get = registry.get_sample_value
    assert get("sluice_tenant_completion_tokens_total", {"tenant": "big", **labels}) == 10
    assert get("sluice_tenant_prompt_tokens_total", {"tenant": "other", **labels}) == 3
    assert get("sluice_tenant_engine_seconds_total", {"tenant": "unknown", **labels}) == 0.1
    assert get("sluice_tenant_requests_total", {"tenant": "small", **labels}) is None


# -- LiveMonitors and the job ----------------------------------------------------------------
def monitor_settings(**extra: Any) -> Settings:
    options: dict[str, Any] = {
        "app_id": "mtest",
        "results_topic": "res",
        "dlq_topic": "dlq",
        "feedback_topic": "fb",
        "requests_topic": "req",
        "metrics_topic": "met",
        "metrics_window_s": 10,
        "metrics_rollup_s": 0,
        "metrics_lateness_s": 1,
        "worker_id": "w",
        "monitor_reference_size": 20,
        "monitor_current_size": 20,
        "monitor_min_current": 10,
        "monitor_permutations": 200,
        "monitor_embed_per_window": 100,
        "monitor_persist_interval_s": 3600,
        "monitor_test_interval_s": 0,
    }
    return Settings(**(options | extra))


class FakeKafka:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.commits: list[dict[tuple[str, int], int]] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, value))

    async def commit(self, positions: dict[tuple[str, int], int]) -> None:
        self.commits.append(dict(positions))

    async def load(self) -> bytes | None:
        latest = [v for t, k, v in self.sent if t.endswith("-state") and k == b"mtest"]
        return latest[-1] if latest else None

    async def load_monitors(self) -> dict[bytes, bytes]:
        return {k: v for t, k, v in self.sent if t.endswith("-state") and k != b"mtest"}


def make_job(kafka: FakeKafka, settings: Settings, clock: FakeClock, registry: Any) -> MetricsJob:
    return MetricsJob(
        settings,
        AvroCodec.default(),
        send=kafka.send,
        commit=kafka.commit,
        load_state=kafka.load,
        clock=clock,
        monitors=LiveMonitors(settings, TopicEmbedder(), registry, clock),
        load_monitors=kafka.load_monitors,
        cost=CostCounters(registry, settings.metrics_cost_top_tenants),
    )


def inputs(settings: Settings, version: str, prompts: list[str], t0: int, offset: int) -> list[Any]:
    """Requests then their results (real Avro), one result per second from ``t0``."""
    codec = AvroCodec.default()
    records = []
    for i, prompt in enumerate(prompts):
        rid = f"{version}-{offset + i}"
        records.append(
            SourceRecord(
                None,
                settings.requests_topic,
                0,
                offset + i,
                None,
                codec.encode(
                    "InferenceRequest", {"request_id": rid, "prompt": prompt, "tenant": "acme"}
                ),
                t0,
            )
        )
    for i in range(len(prompts)):
        rid = f"{version}-{offset + i}"
        value = result(t0 + i * 100, rid=rid, version=version, completion=5 + i % 3) | {
            "text": "Sure.",
            "finish_reason": "stop",
        }
        records.append(
            SourceRecord(
                None,
                settings.results_topic,
                0,
                offset + i,
                None,
                codec.encode("InferenceResult", value),
                t0,
            )
        )
    return records


def test_the_job_flags_a_shifted_version_and_not_its_control() -> None:
    async def run() -> tuple[list[dict[str, Any]], CollectorRegistry, FakeKafka]:
        settings = monitor_settings()
        kafka, clock, registry = FakeKafka(), FakeClock(), CollectorRegistry()
        job = make_job(kafka, settings, clock, registry)
        await job.restore()
        general = [f"general question number {i}" for i in range(40)]
        coding = [f"code question number {i}" for i in range(20)]
        offset = 0
        # window 1: both versions' references; window 3: v2 gets coding prompts
        for version, prompts, t0 in (
            ("v1", general[:20], BASE),
            ("v2", general[:20], BASE + 2_000),
            ("v1", general[20:], BASE + 20_000),
            ("v2", coding, BASE + 22_000),
        ):
            for record in inputs(settings, version, prompts, t0, offset):
                job.feed(record)
            offset += len(prompts)
            await job.step_monitors()
            await job.flush()
        clock.now += 60_000  # idle: the last window closes
        await job.flush()
        codec = AvroCodec.default()
        windows = [codec.decode(v)[1] for t, _, v in kafka.sent if t == settings.metrics_topic]
        return windows, registry, kafka

    windows, registry, kafka = asyncio.run(run())
    last = {w["model_version"]: w for w in windows if w["window_start"] == BASE + 20_000}
    assert last["v2"]["prompt_drift_flagged"] is True
    assert last["v2"]["prompt_drift_p_value"] < 0.01
    assert last["v1"]["prompt_drift_flagged"] is False
    assert last["v1"]["prompt_drift_reference"] == 20 and last["v1"]["prompt_drift_current"] == 20
    assert last["v1"]["tenant"] == "acme" and last["v1"]["answers"] == 20
    assert last["v1"]["refusal_rate"] == 0.0
    get = registry.get_sample_value
    assert get("sluice_monitor_prompt_drift_p_value", {"model": "m", "version": "v2"}) < 0.01
    assert get("sluice_monitor_answers", {"model": "m", "version": "v1"}) == 20
    assert get("sluice_monitor_prompts_total", {"outcome": "embedded"}) == 80
    assert (
        get("sluice_tenant_requests_total", {"tenant": "acme", "model": "m", "version": "v2"}) == 40
    )
    # the complete references were saved at once, per version
    saved = {parse_monitor_key(k) for t, k, _ in kafka.sent if k.startswith(b"monitor:")}
    assert saved == {("mtest", "m", "v1"), ("mtest", "m", "v2")}
    assert all(t == state_topic(monitor_settings()) for t, k, _ in kafka.sent if k != b"m")


def test_a_restarted_job_keeps_the_versions_reference() -> None:
    async def run() -> tuple[int, int]:
        settings = monitor_settings()
        kafka, clock, registry = FakeKafka(), FakeClock(), CollectorRegistry()
        job = make_job(kafka, settings, clock, registry)
        await job.restore()
        for record in inputs(settings, "v1", [f"ref {i}" for i in range(20)], BASE, 0):
            job.feed(record)
        await job.step_monitors()
        await job.flush(final=True)
        restarted = make_job(kafka, settings, clock, CollectorRegistry())
        await restarted.restore()
        assert restarted.monitors is not None and restarted.monitors.monitors is not None
        reading = restarted.monitors.monitors.reading("m", "v1")
        return reading.reference_prompts, reading.current_prompts

    assert asyncio.run(run()) == (20, 0)
    assert monitor_key("a", "m", "v") == b'monitor:["a", "m", "v"]'
    assert parse_monitor_key(b"mtest") is None


def test_quality_gauges_come_from_the_latest_window_of_each_version() -> None:
    windows = [
        {
            "model": "m",
            "model_version": "v1",
            "length_s": 60,
            "window_start": 0,
            "answers": 5,
            "refusals": 5,
            "correction": False,
        },
        {
            "model": "m",
            "model_version": "v1",
            "length_s": 60,
            "window_start": 60_000,
            "answers": 4,
            "refusals": 1,
            "tenant": "a",
            "correction": False,
        },
        {
            "model": "m",
            "model_version": "v1",
            "length_s": 60,
            "window_start": 60_000,
            "answers": 6,
            "refusals": 0,
            "tenant": "b",
            "correction": False,
        },
        {
            "model": "m",
            "model_version": "v1",
            "length_s": 60,
            "window_start": 60_000,
            "answers": 9,
            "refusals": 9,
            "correction": True,
        },
        {
            "model": "m",
            "model_version": "v1",
            "length_s": 10,
            "window_start": 90_000,
            "answers": 9,
            "refusals": 9,
            "correction": False,
        },
        {
            "model": "",
            "model_version": "",
            "length_s": 60,
            "window_start": 60_000,
            "correction": False,
        },
    ]
    latest = latest_quality(windows, 60)
    assert list(latest) == [("m", "v1")]
    assert latest[("m", "v1")].answers == 10 and latest[("m", "v1")].refusal_rate == 0.1


def test_a_version_is_tested_at_most_every_test_interval() -> None:
    async def run() -> list[int]:
        clock = FakeClock()
        settings = monitor_settings(monitor_test_interval_s=5)
        live = LiveMonitors(settings, TopicEmbedder(), None, clock)
        await live.start({})
        assert live.monitors is not None
        tested = []
        for step in range(4):
            live.add_result(ok(f"r{step}"), BASE)
            tested.append(len(await live.step()))
            clock.now += 2_000
        live.close()
        return tested

    # at 0 s, not at 2 s nor 4 s (still changed), again at 6 s
    assert asyncio.run(run()) == [1, 0, 0, 1]


def test_bad_records_on_llm_requests_are_skipped_and_counted() -> None:
    async def run() -> Counter[str]:
        settings = monitor_settings()
        kafka, clock, registry = FakeKafka(), FakeClock(), CollectorRegistry()
        job = make_job(kafka, settings, clock, registry)
        await job.restore()
        for offset, value in enumerate([None, b"", b"not avro", b"\x00\x00\x00\x00\x09xx"]):
            job.feed(SourceRecord(None, settings.requests_topic, 0, offset, None, value, BASE))
        good = inputs(settings, "v1", ["a prompt"], BASE, 4)
        for record in good:
            job.feed(record)
        await job.step_monitors()
        await job.flush()
        assert job.aggregator is not None
        assert job.aggregator.positions()[(settings.requests_topic, 0)] == 5
        return job.aggregator.counts

    counts = asyncio.run(run())
    assert counts["skipped"] == 4 and counts["requests"] == 1 and counts["results"] == 1
