"""The Faust app factory. No app exists until :func:`build_app` is called."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import faust
from mode import Service
from prometheus_client import CollectorRegistry

from streams.pipeline import IntakePipeline
from streams.records import source_record
from streams.settings import Settings

logger = logging.getLogger(__name__)


def faust_app(settings: Settings, bootstrap: str, *, web_port: int) -> faust.App:
    """A Faust app configured for Sluice: raw bytes on the wire (we decode Avro ourselves,
    so a bad record becomes a dead letter instead of crashing the agent), manual acks,
    and the web server bound to loopback on a port we chose (a Faust worker binds
    0.0.0.0:6066 unless told otherwise: two workers on one host would collide)."""
    datadir = (settings.home / "faust").resolve()
    datadir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{b.strip()}" for b in bootstrap.split(",")],
        broker_credentials=_credentials(settings),
        key_serializer="raw",
        value_serializer="raw",
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
        web_enabled=False,
        web_host="127.0.0.1",
        web_port=web_port,
        stream_wait_empty=False,  # our own watermarks decide what is committed
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,  # Faust's own (changelog) topics; ours exist already
        broker_commit_livelock_soft_timeout=3600.0,
    )


def build_app(
    settings: Settings,
    pipeline: IntakePipeline | None,
    bootstrap: str,
    *,
    web_port: int,
    producer: Any = None,
    registry: CollectorRegistry | None = None,
) -> faust.App:
    """The worker's app for its role: the intake agent feeding ``pipeline`` (roles
    ``inference`` and ``all``), the feedback join (roles ``join`` and ``all``), and their
    lifecycle. ``producer`` (an :class:`streams.kafka_clients.OutboxProducer`) publishes
    results and dead letters; None: Faust's own producer. ``registry``: where the metrics
    role's job puts its metrics (the one its /metrics serves); None: a private one."""
    role = settings.worker_role
    if role == "join":
        settings = settings.model_copy(update={"app_id": join_group(settings)})
    if role == "metrics":
        from streams.metrics import WorkerMetrics
        from streams.metrics_windows.job import add_metrics_job

        settings = settings.model_copy(update={"app_id": f"{settings.app_id}-metrics"})
        app = faust_app(settings, bootstrap, web_port=web_port)
        metrics = WorkerMetrics(registry if registry is not None else CollectorRegistry())
        add_metrics_job(app, settings, _codec(settings), metrics)
        return app
    app = faust_app(settings, bootstrap, web_port=web_port)
    if role in ("join", "all") and settings.feedback_join:
        from streams.feedback_join import add_feedback_join
        from streams.metrics import WorkerMetrics

        codec = pipeline.codec if pipeline is not None else _codec(settings)
        metrics = pipeline.metrics if pipeline is not None else WorkerMetrics(CollectorRegistry())
        add_feedback_join(app, settings, codec, metrics, requests_channel(app, settings))
    if role in ("inference", "all"):
        if pipeline is None:
            raise ValueError(f"role {role} needs an intake pipeline")
        _add_intake(app, settings, pipeline, producer)
    return app


def join_group(settings: Settings) -> str:
    """The consumer group (and Faust app id) of workers with role ``join``."""
    return f"{settings.app_id}-join"


def _codec(settings: Settings) -> Any:
    from streams.codecs import codec_from_settings

    return codec_from_settings(settings)


def _add_intake(
    app: faust.App, settings: Settings, pipeline: IntakePipeline, producer: Any
) -> None:
    requests = requests_channel(app, settings)

    @app.agent(requests, name="sluice.intake")
    async def intake(stream: faust.StreamT) -> None:
        await pipeline.ready.wait()
        async for event in stream.noack().events():
            await pipeline.handle(source_record(event.message))

    @app.on_before_shutdown.connect
    async def drain(app: faust.App, **_: Any) -> None:
        # Runs after the fetcher stopped and before the producer is flushed and closed:
        # finish what was accepted, publish it, commit.
        await pipeline.stop()

    @app.on_partitions_revoked.connect
    async def on_revoked(app: faust.App, revoked: set[Hashable], **_: Any) -> None:
        await pipeline.on_partitions_revoked(revoked)

    async def commit(offsets: dict[Hashable, int]) -> bool:
        # Faust's own ack-based commit is bypassed (noack stream): we hand it our
        # watermarks, only for partitions assigned now (the keeper filters them first).
        return bool(await app.consumer._commit_offsets(offsets))

    def assigned() -> set[Hashable]:
        return set(app.consumer.assignment())

    def highwater(tp: Hashable) -> int | None:
        try:
            return int(app.consumer.highwater(tp))
        except Exception:  # partition not (or no longer) assigned
            return None

    class PipelineService(Service):
        """Starts the pipeline once Faust's producer and consumer exist (the drain on
        shutdown happens earlier, in ``on_before_shutdown``; this stop is a fallback)."""

        async def on_start(self) -> None:
            from streams.log_limits import install_repeat_filter

            install_repeat_filter()  # Faust's worker set up its own log handlers by now
            out = producer if producer is not None else app.producer
            if producer is not None:
                await producer.start()
            await pipeline.start(out, commit, highwater, assigned)

        async def on_stop(self) -> None:
            await pipeline.stop()
            if producer is not None:
                await producer.stop()

    app.service(PipelineService)


def requests_channel(app: faust.App, settings: Settings) -> faust.TopicT:
    """The requests topic, with Faust's acks off.

    Offsets of the requests topic are committed by the pipeline's watermarks and by nothing
    else: a topic with acks on is one Faust may commit by itself (from acks, gap filling or
    on a task error), and a commit past a read-but-unanswered request loses it on a crash.
    Every channel on this topic must be declared here, since Faust turns acks on for a topic
    name as soon as any one of its channels has them.
    """
    return app.topic(
        settings.requests_topic,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
        acks=False,
    )


def _credentials(settings: Settings) -> Any:
    """Faust's broker credentials, TLS included (one implementation: streams.security)."""
    from streams.security import faust_credentials

    return faust_credentials(settings)
