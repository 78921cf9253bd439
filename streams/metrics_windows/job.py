"""The metrics job: results, request dead letters and feedback in, ``MetricsWindow`` out.

A Faust agent feeds every record to a :class:`~streams.metrics_windows.aggregator.
WindowAggregator`; a timer flushes it. The aggregator's whole state (open windows, watermark,
per-partition positions and the outbox of closed windows) is the unit of persistence: a
flush writes it, compressed, to a compacted state topic (``<app_id>-metrics-windows-state``)
and waits for the broker's ack, then publishes the outbox on ``settings.metrics_topic``, then
commits the input offsets **of that persisted state**, never further. So:

* a crash before the state is persisted: offsets were not committed past it, the records
  are read again and counted into the restored state once (positions skip what it had);
* a crash after the state is persisted but before (or while) its outbox is published: the
  restored outbox is published again, byte for byte, under the same ``window_id``;
* nothing is committed past a record whose window was neither published nor persisted.

The input channel has Faust's acks off and the stream is ``noack()``: only this job commits
these topics in its consumer group. Run it in a worker of its own (its own ``app_id``), as
the only agent on these topics in that app, and run one such worker: see docs/metrics.md.

It also reads ``llm.requests`` (for the tenant of each result and the prompts of the drift
monitor), feeds the monitors (:mod:`streams.metrics_windows.monitoring`, docs/monitors.md)
and the per-tenant cost counters (:mod:`streams.metrics_windows.cost`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import faust
from prometheus_client import Counter as PromCounter

from schemas.codec import AvroCodec
from schemas.errors import SchemaError
from streams.metrics import WorkerMetrics
from streams.metrics_windows.aggregator import Source, WindowAggregator, WindowConfig
from streams.metrics_windows.cost import CostCounters
from streams.metrics_windows.monitoring import LiveMonitors, parse_monitor_key
from streams.records import SourceRecord, source_record
from streams.settings import Settings

logger = logging.getLogger(__name__)

Send = Callable[[str, bytes, bytes], Awaitable[None]]
Commit = Callable[[dict[tuple[str, int], int]], Awaitable[None]]
LoadState = Callable[[], Awaitable[bytes | None]]
LoadMonitors = Callable[[], Awaitable[dict[bytes, bytes]]]


def window_config(settings: Settings) -> WindowConfig:
    """The aggregator's configuration from the settings."""
    return WindowConfig(
        window_s=settings.metrics_window_s,
        rollup_s=settings.metrics_rollup_s,
        lateness_s=settings.metrics_lateness_s,
        max_tenants=settings.metrics_max_tenants,
        feedback_lookup=settings.metrics_feedback_lookup,
        request_lookup=settings.metrics_request_lookup,
        worker=settings.worker_id,
    )


def state_topic(settings: Settings) -> str:
    """The compacted topic that holds the job's persisted state (one partition)."""
    return f"{settings.app_id}-metrics-windows-state"


def encode_state(state: Mapping[str, Any]) -> bytes:
    return zlib.compress(json.dumps(state, separators=(",", ":")).encode("utf-8"))


def decode_state(data: bytes) -> dict[str, Any]:
    return dict(json.loads(zlib.decompress(data).decode("utf-8")))


class MetricsJob:
    """The I/O around one aggregator: restore, feed, flush. Kafka is injected as callables
    (``send`` waits for the broker's ack; ``commit`` commits offsets per topic-partition)."""

    def __init__(
        self,
        settings: Settings,
        codec: AvroCodec,
        *,
        send: Send,
        commit: Commit,
        load_state: LoadState,
        clock: Callable[[], int] | None = None,
        on_counts: Callable[[Counter[str]], None] | None = None,
        monitors: LiveMonitors | None = None,
        load_monitors: LoadMonitors | None = None,
        cost: CostCounters | None = None,
    ) -> None:
        self.settings = settings
        self.codec = codec
        self._send = send
        self._commit = commit
        self._load_state = load_state
        self._clock = clock or (lambda: int(time.time() * 1000))
        self._on_counts = on_counts or (lambda _delta: None)
        self.monitors = monitors
        self._load_monitors = load_monitors
        self._cost = cost
        self._config = window_config(settings)
        self._key = settings.app_id.encode("utf-8")
        self._expected = {
            settings.results_topic: "InferenceResult",
            settings.dlq_topic: "DeadLetter",
            settings.feedback_topic: "FeedbackEvent",
            settings.requests_topic: "InferenceRequest",
        }
        self.aggregator: WindowAggregator | None = None
        self._restore_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._dirty = False
        self._reported: Counter[str] = Counter()

    @property
    def restored(self) -> bool:
        return self.aggregator is not None

    async def restore(self) -> None:
        """Load the persisted state (once per process; a restarted agent keeps its state)."""
        async with self._restore_lock:
            if self.aggregator is not None:
                return
            data = await self._load_state()
            if data is None:
                logger.info("metrics job: no persisted state, starting empty")
                self.aggregator = WindowAggregator(self._config, self._clock)
            else:
                self.aggregator = WindowAggregator.from_state(
                    decode_state(data), self._config, self._clock
                )
                logger.info(
                    "metrics job: restored %d open windows, %d unpublished, watermark %s",
                    len(self.aggregator.open_windows),
                    len(self.aggregator.outbox),
                    self.aggregator.watermark,
                )
            self._reported = Counter(self.aggregator.counts)
            if self.monitors is not None:
                await self._restore_monitors(self.monitors)
                self.aggregator.annotate = self.monitors.annotate

    async def _restore_monitors(self, monitors: LiveMonitors) -> None:
        saved = await self._load_monitors() if self._load_monitors is not None else {}
        states: dict[tuple[str, str], dict[str, Any]] = {}
        for key, value in saved.items():
            parsed = parse_monitor_key(key)
            if parsed is not None and parsed[0] == self.settings.app_id and value:
                states[(parsed[1], parsed[2])] = decode_state(value)
        await monitors.start(states)

    def feed(self, record: SourceRecord) -> None:
        """Decode and count one input record (synchronous: no await between records)."""
        agg = self.aggregator
        if agg is None:
            raise RuntimeError("metrics job: feed() before restore()")
        source = Source(record.topic, record.partition, record.offset, record.timestamp_ms)
        expected = self._expected.get(record.topic)
        if expected is None:
            logger.warning("metrics job: record from unexpected topic %s", record.topic)
            return
        try:
            _, value = self.codec.decode(record.value, expected=expected)
        except SchemaError as exc:
            if agg.skip(source):
                agg.counts[f"undecodable:{exc.reason_code}"] += 1
                self._dirty = True
            return
        if expected == "InferenceResult":
            tenant = agg.request_tenant(value)
            counted = agg.add_result(value, source)
            if counted and self._cost is not None:
                self._cost.add_result(value, tenant)
            if counted and self.monitors is not None:
                event_ms = int(value.get("created_at") or 0) or record.timestamp_ms
                self.monitors.add_result(value, event_ms)
        elif expected == "InferenceRequest":
            counted = agg.add_request(value, source)
            if counted and self.monitors is not None:
                self.monitors.add_request(value)
        elif expected == "DeadLetter":
            counted = agg.add_dead_letter(value, source)
        else:
            counted = agg.add_feedback(value, source)
        self._dirty = self._dirty or counted

    async def step_monitors(self) -> None:
        """Embed queued prompts and re-run the drift tests (off the event loop)."""
        if self.monitors is not None and self.aggregator is not None:
            await self.monitors.step()

    async def flush(self, *, final: bool = False) -> int:
        """Persist the state, publish closed windows, commit the persisted positions, save
        the monitors' samples when due (always when ``final``). Returns how many windows
        were published."""
        agg = self.aggregator
        if agg is None:
            return 0
        async with self._flush_lock:
            agg.advance()
            pending = agg.outbox
            if not self._dirty and not pending:
                await self._save_monitors(final)
                return 0
            state = encode_state(agg.to_state())
            positions = agg.positions()
            self._dirty = False
            try:
                await self._send(state_topic(self.settings), self._key, state)
                for record in pending:
                    value = self.codec.encode("MetricsWindow", record)
                    await self._send(
                        self.settings.metrics_topic, record["model"].encode("utf-8"), value
                    )
            except Exception:
                self._dirty = True  # persist again next time
                raise
            agg.acknowledge(record["window_id"] for record in pending)
            self._dirty = self._dirty or bool(pending)  # the outbox changed: persist that too
            await self._commit(positions)
            self._report()
            if self.monitors is not None:
                self.monitors.on_closed(pending)
            await self._save_monitors(final)
            return len(pending)

    async def _save_monitors(self, force: bool) -> None:
        if self.monitors is None:
            return
        due = self.monitors.due_states(force=force)
        for i, (key, state) in enumerate(due):
            try:
                await self._send(state_topic(self.settings), key, encode_state(state))
            except Exception:
                self.monitors.unsave(k for k, _ in due[i:])
                raise

    def _report(self) -> None:
        assert self.aggregator is not None
        counts = self.aggregator.counts
        delta = Counter({k: v - self._reported[k] for k, v in counts.items()})
        delta = +delta
        if delta:
            self._on_counts(delta)
        self._reported = Counter(counts)


def add_metrics_job(
    app: faust.App, settings: Settings, codec: AvroCodec, metrics: WorkerMetrics
) -> None:
    """The metrics job as a Faust agent ``sluice.metrics-windows`` plus its flush timer.

    ``app`` must be the metrics worker's own app (its own ``app_id``/consumer group), with
    no other agent on the results, requests-DLQ or feedback topics.
    """
    from faust.types import TP

    records_total = PromCounter(
        "sluice_metrics_records_total",
        "Records read by the metrics job, by what happened to them.",
        ["outcome"],
        registry=metrics.registry,
    )
    windows_total = PromCounter(
        "sluice_metrics_windows_total",
        "MetricsWindow records closed, by kind (window, correction).",
        ["kind"],
        registry=metrics.registry,
    )
    late_total = PromCounter(
        "sluice_metrics_late_records_total",
        "Records that came after their window closed (counted in corrections).",
        registry=metrics.registry,
    )

    registry = metrics.registry
    monitors = None
    if settings.monitor_enabled:
        from streams.monitors.embeddings import MiniLMEmbedder

        monitors = LiveMonitors(
            settings,
            MiniLMEmbedder(threads=settings.torch_threads),
            registry,
            lambda: int(time.time() * 1000),
        )
    cost = CostCounters(registry, settings.metrics_cost_top_tenants)

    def on_counts(delta: Counter[str]) -> None:
        for name, n in delta.items():
            if name in (
                "results",
                "dead_letters",
                "feedback",
                "requests",
                "duplicates",
                "skipped",
            ):
                records_total.labels(outcome=name).inc(n)
            elif name == "windows":
                windows_total.labels(kind="window").inc(n)
            elif name == "corrections":
                windows_total.labels(kind="correction").inc(n)
            elif name == "late_records":
                late_total.inc(n)

    state_channel = app.topic(
        state_topic(settings),
        key_type=bytes,
        value_type=bytes,
        partitions=1,
        compacting=True,
        internal=True,
    )
    bootstrap = ",".join(f"{url.host}:{url.port}" for url in app.conf.broker)

    async def send(topic: str, key: bytes, value: bytes) -> None:
        await app.producer.send_and_wait(topic, key, value, 0, None, None)

    async def commit(positions: dict[tuple[str, int], int]) -> None:
        if positions:
            # skips partitions no longer assigned to this worker
            await app.consumer._commit_offsets({TP(t, p): o for (t, p), o in positions.items()})

    async def load_state() -> bytes | None:
        await state_channel.maybe_declare()
        return await read_latest(
            bootstrap,
            state_topic(settings),
            settings.app_id.encode("utf-8"),
            settings.kafka_client_options(),
        )

    async def load_monitors() -> dict[bytes, bytes]:
        return await read_latest_by_key(
            bootstrap,
            state_topic(settings),
            settings.kafka_client_options(),
            keep=lambda key: parse_monitor_key(key) is not None,
        )

    job = MetricsJob(
        settings,
        codec,
        send=send,
        commit=commit,
        load_state=load_state,
        on_counts=on_counts,
        monitors=monitors,
        load_monitors=load_monitors,
        cost=cost,
    )
    inputs = app.topic(
        settings.results_topic,
        settings.dlq_topic,
        settings.feedback_topic,
        settings.requests_topic,
        key_type=bytes,
        value_type=bytes,
        acks=False,  # committed by the job's flush only
    )

    async def aggregate(stream: faust.StreamT) -> None:
        await job.restore()
        async for event in stream.noack().events():
            job.feed(source_record(event.message))

    app.agent(inputs, name="sluice.metrics-windows")(aggregate)

    async def flush() -> None:
        try:
            await job.flush()
        except Exception:
            logger.exception("metrics job: flush failed; retrying at the next interval")

    app.timer(settings.metrics_snapshot_interval_ms / 1000.0, name="sluice.metrics-flush")(flush)

    async def step_monitors() -> None:
        try:
            await job.step_monitors()
        except Exception:
            logger.exception("metrics job: monitors step failed; retrying at the next interval")

    if monitors is not None:
        app.timer(settings.metrics_snapshot_interval_ms / 1000.0, name="sluice.metrics-monitors")(
            step_monitors
        )

    @app.on_before_shutdown.connect
    async def final_flush(app: faust.App, **_: Any) -> None:
        try:
            await job.flush(final=True)
        except Exception:
            logger.exception("metrics job: final flush failed")
        if monitors is not None:
            monitors.close()


async def read_latest(
    bootstrap: str,
    topic: str,
    key: bytes,
    client_options: Mapping[str, Any],
    *,
    timeout_s: float = 60.0,
) -> bytes | None:
    """The last value of ``key`` on ``topic`` (up to its end when called), or None."""
    found = await read_latest_by_key(
        bootstrap, topic, client_options, keep=lambda k: k == key, timeout_s=timeout_s
    )
    return found.get(key)


async def read_latest_by_key(
    bootstrap: str,
    topic: str,
    client_options: Mapping[str, Any],
    *,
    keep: Callable[[bytes], bool],
    timeout_s: float = 60.0,
) -> dict[bytes, bytes]:
    """The last value of every key on ``topic`` that ``keep`` accepts (up to its end when
    called)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.kafka_clients import stop_consumer, topic_partitions

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        # "earliest", not the default: with "latest", the reset that assign() starts can win
        # over seek_to_beginning() and the records are never returned (aiokafka 0.14)
        auto_offset_reset="earliest",
        **client_options,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in await topic_partitions(consumer, topic)]
        if not tps:
            return {}
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        latest: dict[bytes, bytes] = {}
        # Done when the last record before the end was returned (the last record of a
        # compacted topic is in its active segment, which is never cleaned).
        remaining = {tp for tp in tps if ends[tp] > 0}
        give_up = asyncio.get_running_loop().time() + timeout_s
        while remaining:
            if asyncio.get_running_loop().time() > give_up:
                raise TimeoutError(f"could not read {topic} up to {ends} in {timeout_s} s")
            batches = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp] and record.key is not None and keep(record.key):
                        if record.value is None:
                            latest.pop(record.key, None)  # a tombstone
                        else:
                            latest[record.key] = record.value
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        logger.debug("%s: read up to %s, %d keys", topic, ends, len(latest))
        return latest
    finally:
        await stop_consumer(consumer)
