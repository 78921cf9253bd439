"""The metrics windows: the quantile sketch, the window aggregator, its state and the job's
flush order (with fakes for Kafka; the real codec)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

import pytest

from connectors.tail import describe_value, format_line
from schemas.codec import AvroCodec
from streams.metrics_windows import QuantileSketch, Source, WindowAggregator, WindowConfig
from streams.metrics_windows.job import MetricsJob, decode_state, state_topic
from streams.records import SourceRecord
from streams.settings import Settings

BASE = 1_800_000_000_000  # a multiple of 60 s, epoch ms


# -- sketch -------------------------------------------------------------------------------
def exact_lower_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


@pytest.mark.parametrize("accuracy", [0.01, 0.02, 0.05])
@pytest.mark.parametrize(
    "draw",
    [
        lambda r: r.lognormvariate(3, 1.5),  # latency-like, heavy tail
        lambda r: r.uniform(0.5, 5000),
        lambda r: r.expovariate(1 / 200),
    ],
    ids=["lognormal", "uniform", "exponential"],
)
def test_sketch_quantiles_are_within_the_relative_accuracy(accuracy: float, draw: Any) -> None:
    rng = random.Random(7)
    values = [draw(rng) for _ in range(20_000)]
    sketch = QuantileSketch(accuracy)
    sketch.extend(values)
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0):
        exact = exact_lower_quantile(values, q)
        estimate = sketch.quantile(q)
        assert estimate is not None
        assert abs(estimate - exact) <= accuracy * exact + 1e-12, (q, estimate, exact)
    assert sketch.count == len(values)
    assert sketch.quantile(0.0) == min(values) and sketch.quantile(1.0) == max(values)
    assert sketch.mean == pytest.approx(sum(values) / len(values))


def test_sketch_merge_equals_a_single_pass() -> None:
    rng = random.Random(11)
    values = [rng.lognormvariate(2, 2) for _ in range(5_000)] + [0.0, 0.0005]
    tiny = sum(1 for v in values if v <= 0.001)
    whole = QuantileSketch()
    whole.extend(values)
    parts = [QuantileSketch() for _ in range(3)]
    for i, value in enumerate(values):
        parts[i % 3].add(value)
    merged = QuantileSketch()
    for part in parts:
        merged.merge(part)
    assert merged.buckets == whole.buckets
    assert merged.zero_count == whole.zero_count == tiny >= 2
    assert merged.count == whole.count and (merged.min, merged.max) == (whole.min, whole.max)
    for q in (0.01, 0.5, 0.99):
        assert merged.quantile(q) == whole.quantile(q)


def test_sketch_round_trips_through_its_dict_and_json() -> None:
    sketch = QuantileSketch()
    sketch.extend([1.0, 2.5, 2.5, 900.0, 0.0])
    data = json.loads(json.dumps(sketch.to_dict()))
    again = QuantileSketch.from_dict(data)
    assert again == sketch
    assert again.quantile(0.5) == sketch.quantile(0.5)
    assert len(data["keys"]) == 3  # sparse: only occupied buckets


def test_sketch_refuses_bad_input() -> None:
    sketch = QuantileSketch()
    assert sketch.quantile(0.5) is None and sketch.mean is None
    with pytest.raises(ValueError, match="NaN"):
        sketch.add(float("nan"))
    with pytest.raises(ValueError, match="q must be"):
        sketch.quantile(1.5)
    with pytest.raises(ValueError, match="different accuracy"):
        sketch.merge(QuantileSketch(0.05))
    with pytest.raises(ValueError, match="relative_accuracy"):
        QuantileSketch(1.0)
    broken = sketch.to_dict() | {"count": 3}
    with pytest.raises(ValueError, match="does not match"):
        QuantileSketch.from_dict(broken)


# -- aggregator ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self, now: int = BASE) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def result(
    t: int,
    *,
    model: str = "m",
    version: str = "v1",
    status: str = "OK",
    total: float = 100.0,
    rid: str | None = None,
    tenant: str | None = None,
    batch: int = 4,
    completion: int = 10,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": rid or f"r{t}",
        "model": model,
        "model_version": version,
        "status": status,
        "prompt_tokens": 3,
        "completion_tokens": completion,
        "timings": {
            "queue_ms": 1.0,
            "batch_wait_ms": 2.0,
            "inference_ms": total - 3.0,
            "total_ms": total,
        },
        "batch_size": batch,
        "worker": "w",
        "created_at": t,
    }
    if tenant is not None:
        record["tenant"] = tenant
    return record


def dead(t: int, reason: str = "bad_sampling") -> dict[str, Any]:
    return {"reason_code": reason, "reason": "x", "created_at": t}


def feedback(t: int, rid: str, score: int) -> dict[str, Any]:
    return {"request_id": rid, "score": score, "created_at": t}


def aggregator(**config: Any) -> tuple[WindowAggregator, FakeClock]:
    clock = FakeClock()
    options: dict[str, Any] = {"window_s": 10, "rollup_s": 60, "lateness_s": 2, "worker": "w"}
    options.update(config)
    return WindowAggregator(WindowConfig(**options), clock), clock


def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["window_id"]: r for r in records}


def test_a_window_counts_everything_and_closes_on_the_watermark() -> None:
    agg, _ = aggregator(rollup_s=0)
    latencies = [10.0, 20.0, 30.0, 40.0, 1000.0]
    for i, total in enumerate(latencies):
        agg.add_result(result(BASE + i * 1000, total=total, batch=i + 1), None)
    agg.add_result(result(BASE + 6000, status="ERROR", rid="bad"))
    agg.add_dead_letter(dead(BASE + 7000))
    agg.add_dead_letter(dead(BASE + 7100, "undecodable"))
    agg.add_feedback(feedback(BASE + 8000, f"r{BASE}", 1))
    agg.add_feedback(feedback(BASE + 8500, f"r{BASE + 1000}", -1))
    agg.add_feedback(feedback(BASE + 8600, "never-seen", 1))
    assert agg.outbox == []  # watermark 8.6 s - 2 s < 10 s
    agg.add_result(result(BASE + 11_999))  # watermark 9.999 s: still open
    assert agg.outbox == []
    agg.add_result(result(BASE + 12_000))  # watermark 10 s = the window's end
    windows = by_id(agg.outbox)
    model = windows[f"10s:{BASE}:m:v1:"]
    assert model["requests"] == {"OK": 5, "ERROR": 1} and model["requests_total"] == 6
    assert model["records"] == 8 and model["correction"] is False
    assert (model["window_start"], model["window_end"], model["length_s"]) == (
        BASE,
        BASE + 10_000,
        10,
    )
    assert model["prompt_tokens"] == 18 and model["completion_tokens"] == 60
    assert model["tokens_per_s"] == 6.0
    assert model["batch_size_max"] == 5
    assert model["batch_size_mean"] == pytest.approx((1 + 2 + 3 + 4 + 5 + 4) / 6)
    assert model["feedback_count"] == 2 and model["feedback_mean_score"] == 0.0
    total = model["latency"]["total"]
    assert total["count"] == 6
    # sorted 10 20 30 40 100 1000: lower quantiles at ranks floor(q * 5)
    assert total["p50_ms"] == pytest.approx(30.0, rel=0.01)
    assert total["p99_ms"] == pytest.approx(100.0, rel=0.01)
    assert total["max_ms"] == 1000.0
    assert model["latency"]["queue"]["p95_ms"] == pytest.approx(1.0, rel=0.01)
    unattributed = windows[f"10s:{BASE}:::"]
    assert unattributed["dead_letters"] == {"bad_sampling": 1, "undecodable": 1}
    assert unattributed["dead_letters_total"] == 2
    assert unattributed["feedback_count"] == 1 and unattributed["requests_total"] == 0
    assert [w.start_ms for w in agg.open_windows] == [BASE + 10_000]


def test_rollups_hold_the_same_records_as_their_windows() -> None:
    agg, _ = aggregator()
    rng = random.Random(3)
    for i in range(300):
        agg.add_result(result(BASE + i * 200, total=rng.uniform(5, 500)))
    agg.add_result(result(BASE + 70_000))
    records = agg.outbox
    small = [r for r in records if r["length_s"] == 10]
    rollups = [r for r in records if r["length_s"] == 60]
    assert len(small) == 6 and len(rollups) == 1
    assert sum(r["requests_total"] for r in small) == rollups[0]["requests_total"] == 300
    merged = QuantileSketch()
    for r in small:
        merged.merge(QuantileSketch.from_dict(r["latency"]["total"]["sketch"]))
    rollup = rollups[0]["latency"]["total"]["sketch"]
    assert merged.to_dict() == rollup | {"sum": pytest.approx(rollup["sum"])}


def test_a_late_record_becomes_a_correction_never_dropped() -> None:
    agg, _ = aggregator(rollup_s=0)
    agg.add_result(result(BASE + 1000))
    agg.add_result(result(BASE + 15_000))  # watermark 13 s: the first window closes
    assert [r["window_id"] for r in agg.outbox] == [f"10s:{BASE}:m:v1:"]
    agg.acknowledge([f"10s:{BASE}:m:v1:"])
    agg.add_result(result(BASE + 2000, status="ERROR"))  # late
    agg.add_result(result(BASE + 3000))  # late, same correction
    assert agg.outbox == []  # a correction collects late records for one window length
    assert agg.counts["late_records"] == 2
    agg.add_result(result(BASE + 25_000))  # watermark 23 s >= 13 s + 10 s
    corrections = [r for r in agg.outbox if r["correction"]]
    assert len(corrections) == 1
    correction = corrections[0]
    assert correction["window_id"] == f"10s:{BASE}:m:v1::correction@{BASE + 13_000}"
    assert (correction["window_start"], correction["length_s"]) == (BASE, 10)
    assert correction["requests"] == {"ERROR": 1, "OK": 1}
    assert correction["late_records"] == correction["records"] == 2
    assert agg.counts["corrections"] == 1
    # the window [10 s, 20 s) closed normally beside it
    assert f"10s:{BASE + 10_000}:m:v1:" in by_id(agg.outbox)


def test_event_time_runs_on_with_the_clock_when_nothing_arrives() -> None:
    agg, clock = aggregator(rollup_s=0)
    agg.add_result(result(BASE + 9000))
    assert agg.advance() == []
    clock.now += 2000  # idle exactly the lateness: nothing moves
    assert agg.advance() == []
    clock.now += 2999  # watermark 9 s - 2 s + 2.999 s = 9.999 s
    assert agg.advance() == []
    clock.now += 1
    closed = agg.advance()
    assert [r["window_id"] for r in closed] == [f"10s:{BASE}:m:v1:"]
    assert closed[0]["closed_at"] == clock.now


def test_each_source_offset_is_counted_once() -> None:
    agg, _ = aggregator(rollup_s=0)
    first = Source("results", 0, 5, 0)
    assert agg.add_result(result(BASE), first)
    assert not agg.add_result(result(BASE), first)  # re-delivered
    assert not agg.add_result(result(BASE), Source("results", 0, 4, 0))
    assert agg.add_result(result(BASE), Source("results", 1, 4, 0))
    assert agg.add_result(result(BASE), Source("results", 0, 9, 0))  # a gap is allowed
    assert agg.positions() == {("results", 0): 10, ("results", 1): 5}
    assert agg.counts["duplicates"] == 2 and agg.counts["offset_gaps"] == 1
    assert agg.skip(Source("dlq", 0, 0, 0)) and not agg.skip(Source("dlq", 0, 0, 0))


def test_the_broker_timestamp_stands_in_for_a_missing_created_at() -> None:
    agg, _ = aggregator(rollup_s=0)
    record = result(0)
    agg.add_result(record, Source("results", 0, 0, BASE + 3000))
    assert [w.start_ms for w in agg.open_windows] == [BASE]


def test_tenants_beyond_the_limit_fold_into_one_bucket() -> None:
    agg, _ = aggregator(rollup_s=0, max_tenants=2)
    for i, tenant in enumerate(["a", "b", "c", "a", "d", None]):
        agg.add_result(result(BASE + i, tenant=tenant))
    tenants = sorted({w.tenant for w in agg.open_windows})
    assert tenants == ["", "a", "b"]
    assert agg.counts["tenants_folded"] == 2


def test_feedback_follows_its_result_to_model_version_and_tenant() -> None:
    agg, _ = aggregator(rollup_s=0, feedback_lookup=2)
    agg.add_result(result(BASE, model="m", version="v2", rid="x", tenant="acme"))
    agg.add_result(result(BASE, rid="y"))
    agg.add_result(result(BASE, rid="z"))  # pushes "x" out of the lookup of 2
    agg.add_feedback(feedback(BASE + 1, "y", 1))
    agg.add_feedback(feedback(BASE + 2, "x", -1))
    agg.add_result(result(BASE + 20_000))
    windows = by_id(agg.outbox)
    assert windows[f"10s:{BASE}:m:v1:"]["feedback_count"] == 1
    assert windows[f"10s:{BASE}:::"]["feedback_mean_score"] == -1.0
    assert agg.counts["feedback_unattributed"] == 1


def without_closed_at(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "closed_at"}


def random_events(seed: int, n: int) -> list[tuple[str, dict[str, Any], Source]]:
    """Results, dead letters and feedback on a few partitions, out of order within the
    lateness and now and then beyond it."""
    rng = random.Random(seed)
    events: list[tuple[str, dict[str, Any], Source]] = []
    offsets: Counter[tuple[str, int]] = Counter()
    clock_ms = BASE
    rids: list[str] = []
    for i in range(n):
        clock_ms += rng.randint(0, 400)
        jitter = rng.choice([0, 0, 0, -500, -1500, -6000])  # -6 s: late
        t = clock_ms + jitter
        kind = rng.choices(["result", "dead", "feedback"], [8, 1, 2])[0]
        if kind == "feedback" and not rids:
            kind = "result"
        topic = {"result": "results", "dead": "dlq", "feedback": "feedback"}[kind]
        partition = 0 if topic == "dlq" else rng.randrange(3)
        source = Source(topic, partition, offsets[(topic, partition)], 0)
        offsets[(topic, partition)] += 1
        if kind == "result":
            rid = f"req-{i}"
            rids.append(rid)
            record = result(
                t,
                model=rng.choice(["m", "n"]),
                version=rng.choice(["v1", "v2"]),
                status=rng.choice(["OK", "OK", "OK", "ERROR", "EXPIRED"]),
                total=rng.lognormvariate(4, 1),
                rid=rid,
                tenant=rng.choice([None, "a", "b", "c"]),
                batch=rng.randint(1, 16),
                completion=rng.randint(0, 64),
            )
        elif kind == "dead":
            record = dead(t, rng.choice(["bad_sampling", "undecodable"]))
        else:
            record = feedback(t, rng.choice(rids), rng.choice([-1, 0, 1]))
        events.append((kind, record, source))
    return events


def feed(agg: WindowAggregator, clock: FakeClock, events: list[Any]) -> None:
    for kind, record, source in events:
        clock.now += 7
        {
            "result": agg.add_result,
            "dead": agg.add_dead_letter,
            "feedback": agg.add_feedback,
        }[kind](record, source)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_restart_from_the_serialised_state_emits_exactly_what_one_run_emits(seed: int) -> None:
    events = random_events(seed, 2_000)
    config = {"max_tenants": 2, "feedback_lookup": 500}

    single, clock = aggregator(**config)
    feed(single, clock, events)
    clock.now += 120_000
    single.advance()
    expected = single.outbox

    # the same stream, with a "crash" every few hundred records: the state is serialised to
    # JSON, the aggregator thrown away and rebuilt, and some records are delivered again
    agg, clock = aggregator(**config)
    published: list[dict[str, Any]] = []
    rng = random.Random(seed)
    i = 0
    while i < len(events):
        step = rng.randint(50, 400)
        feed(agg, clock, events[i : i + step])
        i += step
        if rng.random() < 0.5:  # publish and acknowledge some of the outbox before the crash
            out = agg.outbox
            published.extend(out)
            agg.acknowledge(r["window_id"] for r in out)
        state = json.loads(json.dumps(agg.to_state()))
        agg = WindowAggregator.from_state(state, agg.config, clock)
        replay = rng.randint(0, 50)  # re-delivery after the restart: must not count twice
        feed(agg, clock, events[max(0, i - replay) : i])
    clock.now += 120_000
    agg.advance()
    published.extend(agg.outbox)

    # closed_at is the wall time of closing: a window closed again after a restart may
    # differ there (the clock ran on during the replay), and only there
    assert [without_closed_at(r) for r in published] == [without_closed_at(r) for r in expected]
    assert len({r["window_id"] for r in expected}) == len(expected)
    assert any(r["correction"] for r in expected)  # the stream has late records
    counted = sum(r["records"] for r in expected if r["length_s"] == 10)
    assert counted == len(events)  # nothing dropped, nothing counted twice
    assert agg.counts["duplicates"] > 0


def test_every_window_encodes_as_a_metrics_window_record() -> None:
    codec = AvroCodec.default()
    agg, clock = aggregator()
    feed(agg, clock, random_events(5, 300))
    clock.now += 200_000
    agg.advance()
    assert agg.outbox
    for record in agg.outbox:
        name, decoded = codec.decode(codec.encode("MetricsWindow", record))
        assert name == "MetricsWindow"
        assert decoded == record


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="window_s"):
        WindowConfig(window_s=0)
    with pytest.raises(ValueError, match="lateness_s"):
        WindowConfig(lateness_s=-1)
    assert WindowConfig(window_s=10, rollup_s=10).lengths == (10,)
    assert WindowConfig(window_s=10, rollup_s=60).lengths == (10, 60)


# -- the job's flush order (Kafka faked; the codec is real) ---------------------------------
class FakeKafka:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.state: bytes | None = None
        self.fail_topic: str | None = None

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        if topic == self.fail_topic:
            raise RuntimeError("broker down")
        self.log.append(("send", topic))
        if topic.endswith("-metrics-windows-state"):
            self.state = value

    async def commit(self, positions: dict[tuple[str, int], int]) -> None:
        self.log.append(("commit", dict(positions)))

    async def load(self) -> bytes | None:
        return self.state


def job_settings() -> Settings:
    return Settings(
        app_id="mtest",
        results_topic="res",
        dlq_topic="dlq",
        feedback_topic="fb",
        metrics_topic="met",
        metrics_window_s=10,
        metrics_rollup_s=0,
        metrics_lateness_s=1,
        worker_id="w",
    )


def make_job(kafka: FakeKafka, codec: AvroCodec, clock: FakeClock) -> MetricsJob:
    return MetricsJob(
        job_settings(),
        codec,
        send=kafka.send,
        commit=kafka.commit,
        load_state=kafka.load,
        clock=clock,
    )


def record_on(topic: str, offset: int, value: bytes) -> SourceRecord:
    return SourceRecord(None, topic, 0, offset, b"k", value, BASE)


def test_the_job_persists_then_publishes_then_commits_the_persisted_positions() -> None:
    codec = AvroCodec.default()
    kafka, clock = FakeKafka(), FakeClock()

    async def run() -> None:
        job = make_job(kafka, codec, clock)
        with pytest.raises(RuntimeError, match="before restore"):
            job.feed(record_on("res", 0, codec.encode("InferenceResult", result(BASE))))
        await job.restore()
        job.feed(record_on("res", 0, codec.encode("InferenceResult", result(BASE))))
        job.feed(record_on("dlq", 0, b"not avro"))  # counted as skipped, offset passed
        job.feed(record_on("res", 1, codec.encode("InferenceResult", result(BASE + 12_000))))
        assert await job.flush() == 1
        state_name = state_topic(job.settings)
        assert kafka.log == [
            ("send", state_name),
            ("send", "met"),
            ("commit", {("res", 0): 2, ("dlq", 0): 1}),
        ]
        assert decode_state(kafka.state or b"")["outbox"][0]["window_id"] == f"10s:{BASE}:m:v1:"
        kafka.log.clear()
        assert await job.flush() == 0  # the acknowledged outbox is persisted once more
        assert kafka.log == [("send", state_name), ("commit", {("res", 0): 2, ("dlq", 0): 1})]
        kafka.log.clear()
        assert await job.flush() == 0 and kafka.log == []  # nothing new: nothing to do

    asyncio.run(run())


def test_a_failed_publish_commits_nothing_and_the_restored_job_publishes_again() -> None:
    codec = AvroCodec.default()
    kafka, clock = FakeKafka(), FakeClock()

    async def run() -> None:
        job = make_job(kafka, codec, clock)
        await job.restore()
        job.feed(record_on("res", 0, codec.encode("InferenceResult", result(BASE))))
        job.feed(record_on("res", 1, codec.encode("InferenceResult", result(BASE + 12_000))))
        kafka.fail_topic = "met"
        with pytest.raises(RuntimeError, match="broker down"):
            await job.flush()
        assert not any(entry[0] == "commit" for entry in kafka.log)
        # the process dies; a new one restores the persisted state and publishes its outbox
        kafka.fail_topic = None
        kafka.log.clear()
        again = make_job(kafka, codec, clock)
        await again.restore()
        again.feed(record_on("res", 0, codec.encode("InferenceResult", result(BASE))))  # re-read
        assert await again.flush() == 1
        assert kafka.log[1] == ("send", "met")
        assert kafka.log[2] == ("commit", {("res", 0): 2})
        assert again.aggregator is not None and again.aggregator.counts["duplicates"] == 1

    asyncio.run(run())


def test_tail_prints_one_readable_line_per_window() -> None:
    codec = AvroCodec.default()
    agg, _ = aggregator(rollup_s=0)
    for i, total in enumerate([800.0, 900.0, 2500.0]):
        agg.add_result(result(BASE + i, total=total, rid=f"q{i}", batch=2 + i))
    agg.add_result(result(BASE + 5, status="ERROR", total=5.0))
    agg.add_feedback(feedback(BASE + 6, "q0", 1))
    agg.add_dead_letter(dead(BASE + 7))
    agg.add_result(result(BASE + 15_000))
    agg.add_result(result(BASE + 8, rid="late"))
    agg.add_result(result(BASE + 40_000))
    lines = {}
    for record in agg.outbox:
        entry = {"partition": 0, "offset": 0, "key": "m"}
        entry["value"] = describe_value(codec, codec.encode("MetricsWindow", record))
        lines[record["window_id"]] = format_line(entry)
    assert lines[f"10s:{BASE}:m:v1:"] == (
        # totals 5 800 900 2500: p50 = 800, p99 = 900 (lower quantiles), within 1 %
        "2027-01-15T08:00:00Z 10s m/v1 req 4 (ERROR 1 OK 3) dlq 0 p50 804ms p99 907ms "
        "tok/s 4.0 batch 3.2/4 feedback 1 (+1.00)"
    )
    assert lines[f"10s:{BASE}:::"].startswith(
        "2027-01-15T08:00:00Z 10s (no model)/- req 0 dlq 1 (bad_sampling 1) p50 - p99 -"
    )
    correction = next(v for k, v in lines.items() if "correction@" in k)
    assert " m/v1 CORRECTION +1 late req 1 (OK 1) " in correction
    other = format_line({"partition": 0, "offset": 1, "key": None, "value": {"_schema": "X"}})
    assert json.loads(other)["value"] == {"_schema": "X"}
