"""``sluice fuzz``: bad payloads mixed with valid requests, against a real broker and worker.

The run is isolated: its own topics (``sluice-fuzz-<tag>.*``) and consumer group, and a
worker process it starts itself, so it never mixes with production traffic and can watch
that worker's memory (``/proc/<pid>/status`` VmRSS) and liveness. The broker is the
configured one (``SLUICE_KAFKA_BOOTSTRAP``), else the local one (started, and stopped
afterwards, when it is not running). Every payload is published as raw bytes, then results
and dead letters are read back until each payload is accounted for
(:mod:`connectors.fuzzing.check`), and the group's committed offsets must reach the end of
every partition (no stalled partition).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.fuzzing.check import Sent, Tally
from connectors.fuzzing.payloads import BAD_WEIGHTS, Payload, generate
from connectors.processes import WORKER_READY, WorkerProcess, settings_env
from schemas.codec import AvroCodec
from schemas.errors import SluiceError
from streams.settings import Settings

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Payload i is sent by the producer of COMPRESSIONS[i % 5].
COMPRESSIONS = (None, "gzip", "snappy", "lz4", "zstd")


class FuzzError(SluiceError):
    """The fuzz run could not be carried out (no broker, the worker never became ready)."""

    reason_code = "fuzz"


@dataclass(frozen=True)
class FuzzOptions:
    bad: int = 10_000
    valid: int = 500
    seed: int = 0
    backend: str = "benchmark"
    families: tuple[str, ...] = tuple(BAD_WEIGHTS)
    timeout_s: float = 600.0  # for the answers, after the last payload was sent
    worker_ready_s: float = 300.0
    keep_topics: bool = False
    role: str = "all"  # the worker's default: inference and the feedback join (reads requests too)


@dataclass
class FuzzReport:
    tally: Tally
    settings: Settings
    send_s: float = 0.0
    answer_s: float = 0.0
    worker_pid: int | None = None
    worker_alive: bool = False
    worker_exit: int | None = None
    rss_mb: dict[str, float] = field(default_factory=dict)  # start, peak, end
    committed: dict[int, int] = field(default_factory=dict)
    ends: dict[int, int] = field(default_factory=dict)
    worker_log: Path | None = None

    @property
    def committed_to_end(self) -> bool:
        return bool(self.ends) and all(self.committed.get(p, 0) == e for p, e in self.ends.items())

    def problems(self) -> list[str]:
        out = self.tally.problems()
        if not self.worker_alive:
            out.append(f"the worker died during the run (exit code {self.worker_exit})")
        if not self.committed_to_end:
            out.append(f"committed offsets {self.committed} do not reach the ends {self.ends}")
        return out


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` now (VmRSS), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class RssWatch:
    """Samples a process's VmRSS every ``interval_s`` on a thread: start, peak, last."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.start: float | None = rss_mb(pid)
        self.peak = self.start or 0.0
        self.last = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = rss_mb(self.pid)
            if value is None:
                return
            self.last = value
            self.peak = max(self.peak, value)

    def figures(self) -> dict[str, float]:
        return {"start": self.start or 0.0, "peak": self.peak, "end": self.last or 0.0}


def run_settings(settings: Settings, bootstrap: str, options: FuzzOptions, tag: str) -> Settings:
    """``settings`` on this run's own topics and group, with the run's backend."""
    prefix = f"sluice-fuzz-{tag}"
    return settings.model_copy(
        update={
            "kafka_bootstrap": bootstrap,
            "app_id": prefix,
            "requests_topic": f"{prefix}.requests",
            "results_topic": f"{prefix}.results",
            "dlq_topic": f"{prefix}.requests.dlq",
            "feedback_topic": f"{prefix}.feedback",
            "feedback_dlq_topic": f"{prefix}.feedback.dlq",
            "training_topic": f"{prefix}.training-examples",
            "metrics_topic": f"{prefix}.metrics",
            "control_topic": f"{prefix}.control",
            "backend": options.backend,
            "worker_role": options.role,
            "metrics_port": 0,
        }
    )


def run_fuzz(settings: Settings, options: FuzzOptions, progress: Progress = print) -> FuzzReport:
    """The whole run: broker (if needed), topics, worker, payloads, answers, report."""
    broker = None
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        from streams.bootstrap import local_kafka

        kafka = local_kafka(settings)
        info = kafka.status()
        if info is None:
            progress("starting the local Kafka broker")
            info = kafka.up()
            broker = kafka
        bootstrap = info.bootstrap
    tag = uuid.uuid4().hex[:8]
    rs = run_settings(settings, bootstrap, options, tag)
    try:
        return _run(rs, options, tag, progress)
    finally:
        if not options.keep_topics:
            with contextlib.suppress(Exception):
                asyncio.run(_delete_topics(rs))
        if broker is not None:
            progress("stopping the local Kafka broker")
            broker.down()


def _run(settings: Settings, options: FuzzOptions, tag: str, progress: Progress) -> FuzzReport:
    from streams.topics import ensure_topics

    asyncio.run(ensure_topics(settings, settings.kafka_bootstrap or ""))
    codec = AvroCodec.default()
    weights = {f: w for f, w in BAD_WEIGHTS.items() if f in options.families}
    payloads = generate(
        options.bad, options.valid, seed=options.seed, tag=f"fz{tag}", codec=codec, weights=weights
    )
    log = settings.home / "logs" / f"fuzz-worker-{tag}.log"
    worker = WorkerProcess(log, env=settings_env(settings)).start()
    progress(f"worker pid {worker.pid} ({options.backend}), log {log}; topics sluice-fuzz-{tag}.*")
    try:
        if not worker.wait_for_log(WORKER_READY, timeout=options.worker_ready_s):
            raise FuzzError(f"the worker did not become ready:\n{worker.log_tail(30)}")
        assert worker.pid is not None
        with RssWatch(worker.pid) as rss:
            report = asyncio.run(_exchange(settings, options, payloads, codec, worker, progress))
        report.worker_pid = worker.pid
        report.rss_mb = rss.figures()
        report.worker_alive = worker.alive()
        report.worker_log = log
    finally:
        exit_code = worker.stop()
    report.worker_exit = exit_code
    return report


async def _exchange(
    settings: Settings,
    options: FuzzOptions,
    payloads: list[Payload],
    codec: AvroCodec,
    worker: WorkerProcess,
    progress: Progress,
) -> FuzzReport:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from streams.kafka_clients import stop_consumer

    # Every Kafka compression codec, round-robin: a producer's choice must never stop a
    # worker (one that cannot decompress a batch crashes its fetcher on every restart).
    producers = [
        AIOKafkaProducer(
            bootstrap_servers=settings.kafka_bootstrap,
            acks="all",
            enable_idempotence=True,  # a retried send must not become a second payload
            linger_ms=5,
            max_request_size=2**20,
            compression_type=compression,
            **settings.kafka_client_options(),
        )
        for compression in COMPRESSIONS
    ]
    for producer in producers:
        await producer.start()
    started = time.monotonic()
    try:
        futures = [
            await producers[i % len(producers)].send(
                settings.requests_topic, p.value, key=p.key, timestamp_ms=p.timestamp_ms
            )
            for i, p in enumerate(payloads)
        ]
        metadata = await asyncio.gather(*futures)
    finally:
        for producer in producers:
            await producer.stop()
    sent = [Sent(p, m.partition, m.offset) for p, m in zip(payloads, metadata, strict=True)]
    report = FuzzReport(Tally(sent), settings, send_s=time.monotonic() - started)
    progress(f"sent {len(sent)} payloads in {report.send_s:.1f}s; reading answers")

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 2**20,
        fetch_max_bytes=64 * 2**20,
        **settings.kafka_client_options(),
    )
    await consumer.start()
    tally = report.tally
    try:
        tps = [TopicPartition(settings.results_topic, p) for p in range(settings.partitions)]
        tps.append(TopicPartition(settings.dlq_topic, 0))
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + options.timeout_s
        settle: float | None = None  # keep reading a little after the last answer: duplicates
        shown = loop.time()
        counts = {"results": 0, "dead letters": 0}
        while loop.time() < give_up:
            for tp, batch in (await consumer.getmany(timeout_ms=500)).items():
                for message in batch:
                    try:
                        _, record = codec.decode(message.value)
                    except SluiceError as exc:
                        tally.unexpected.append(f"{tp.topic}@{message.offset} undecodable: {exc}")
                        continue
                    if tp.topic == settings.dlq_topic:
                        counts["dead letters"] += 1
                        tally.add_letter(record)
                    else:
                        counts["results"] += 1
                        tally.add_result(record)
            now = loop.time()
            if now - shown >= 5:
                shown = now
                progress(
                    f"accounted {tally.accounted}/{len(sent)} (results {counts['results']}, "
                    f"dead letters {counts['dead letters']})"
                )
            if not worker.alive():
                break
            if tally.accounted == len(sent):
                settle = settle or now + 3.0
                if now >= settle:
                    break
        report.answer_s = time.monotonic() - started - report.send_s
        report.committed, report.ends = await _committed(settings, consumer, give_up=30.0)
    finally:
        await stop_consumer(consumer)
    return report


async def _committed(
    settings: Settings, consumer: Any, give_up: float
) -> tuple[dict[int, int], dict[int, int]]:
    """(committed, end) offsets of the requests topic; waits up to ``give_up`` seconds for
    the commits to reach the ends (the worker commits every ``commit_interval_ms``)."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    tps = [TopicPartition(settings.requests_topic, p) for p in range(settings.partitions)]
    ends = {tp.partition: e for tp, e in (await consumer.end_offsets(tps)).items()}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options()
    )
    await admin.start()
    committed: dict[int, int] = {}
    try:
        stop_at = time.monotonic() + give_up
        while True:
            offsets = await admin.list_consumer_group_offsets(settings.app_id)
            committed = {
                tp.partition: meta.offset
                for tp, meta in offsets.items()
                if tp.topic == settings.requests_topic
            }
            if all(committed.get(p, 0) == e for p, e in ends.items()) or time.monotonic() > stop_at:
                return committed, ends
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def _delete_topics(settings: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from streams.topics import topic_specs

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_options()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        names = [s.name for s in topic_specs(settings) if s.name in existing]
        names += [t for t in existing if t.startswith(f"{settings.app_id}-")]  # Faust's own
        await admin.delete_topics(names)
    finally:
        await admin.close()


def format_report(report: FuzzReport) -> list[str]:
    """The run's figures as lines of text."""
    s = report.tally.summary()
    rss = report.rss_mb
    lines = [
        f"sent {s['sent']} in {report.send_s:.1f}s (none/gzip/snappy/lz4/zstd in turn): "
        + ", ".join(f"{k} {v}" for k, v in s["sent_by_family"].items()),
        f"must be dead-lettered {s['must_dlq']}: in the DLQ {s['must_dlq_in_dlq']}; "
        f"mutated but still decodable {s['may_decode']}",
        "dead letters by reason: " + ", ".join(f"{k} {v}" for k, v in s["dlq_by_reason"].items()),
        "answered: " + (", ".join(f"{k} {v}" for k, v in s["answered"].items()) or "none"),
        f"accounted {s['accounted']}/{s['sent']} in {report.answer_s:.1f}s after sending; "
        f"missing {s['missing']}, duplicates {s['duplicates']}, answered wrongly {s['wrong']}, "
        f"unexpected records {s['unexpected']}",
        f"worker pid {report.worker_pid}: alive at the end {report.worker_alive} "
        f"(exit code after SIGTERM {report.worker_exit}); RSS MiB start {rss.get('start', 0):.0f}, "
        f"peak {rss.get('peak', 0):.0f}, end {rss.get('end', 0):.0f}",
        f"committed offsets reach the end of every partition: {report.committed_to_end} "
        f"(committed {report.committed}, ends {report.ends})",
    ]
    problems = report.problems()
    lines.append("PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems))
    return lines
