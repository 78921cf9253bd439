"""The Faust app factory. No app exists until :func:`build_app` is called."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import faust
from mode import Service

from streams.pipeline import IntakePipeline
from streams.records import SourceRecord
from streams.settings import Settings

logger = logging.getLogger(__name__)


def faust_app(settings: Settings, bootstrap: str, *, web_port: int) -> faust.App:
    """A Faust app configured for Sluice: raw bytes on the wire (we decode Avro ourselves,
    so a bad record becomes a dead letter instead of crashing the agent), manual acks,
    and the web server bound to loopback on a port we chose (FAUST_NOTES #4)."""
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
    settings: Settings, pipeline: IntakePipeline, bootstrap: str, *, web_port: int
) -> faust.App:
    """The worker's app: the intake agent feeding ``pipeline``, plus its lifecycle."""
    app = faust_app(settings, bootstrap, web_port=web_port)
    requests = requests_channel(app, settings)

    @app.agent(requests, name="sluice.intake")
    async def intake(stream: faust.StreamT) -> None:
        await pipeline.ready.wait()
        async for event in stream.noack().events():
            await pipeline.handle(_source_record(event.message))

    if settings.feedback_join:
        _add_feedback_join(app, settings, pipeline)

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
        # watermarks. _commit_offsets skips partitions no longer assigned to us.
        return bool(await app.consumer._commit_offsets(offsets))

    def highwater(tp: Hashable) -> int | None:
        try:
            return int(app.consumer.highwater(tp))
        except Exception:  # partition not (or no longer) assigned
            return None

    class PipelineService(Service):
        """Starts the pipeline once Faust's producer and consumer exist (the drain on
        shutdown happens earlier, in ``on_before_shutdown``; this stop is a fallback)."""

        async def on_start(self) -> None:
            await pipeline.start(app.producer, commit, highwater)

        async def on_stop(self) -> None:
            await pipeline.stop()

    app.service(PipelineService)
    return app


def _source_record(message: Any) -> SourceRecord:
    """A Faust message as the pipeline's record (Faust timestamps are seconds)."""
    return SourceRecord(
        tp=message.tp,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=int((message.timestamp or 0) * 1000),
    )


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
    if settings.kafka_sasl_mechanism and settings.kafka_sasl_username:
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else "",
            mechanism=settings.kafka_sasl_mechanism,
        )
    return None


def _add_feedback_join(app: faust.App, settings: Settings, pipeline: IntakePipeline) -> None:
    """The agent that joins requests, results and feedback into training examples."""
    from streams.feedback import Emit, FeedbackJoiner
    from streams.records import dead_letter
    from streams.redaction import Redactor

    codec, metrics = pipeline.codec, pipeline.metrics
    table = app.Table(
        f"{settings.app_id}-feedback-join",
        default=None,
        partitions=settings.partitions,  # co-partitioned with the three topics
        # no key/value types: plain JSON on the changelog (str keys, dict values)
    )

    def on_outcome(outcome: str) -> None:
        metrics.feedback_total.labels(outcome=outcome).inc()

    joiner = FeedbackJoiner(
        table,
        Redactor(),
        window_ms=settings.feedback_window_ms,
        wait_ms=settings.feedback_wait_ms,
        max_correction_chars=settings.max_prompt_chars,
        on_outcome=on_outcome,
    )
    # Results and feedback are Faust's to commit (acks); requests are the watermarks' (see
    # requests_channel), so the join reads them through a second agent.
    results_and_feedback = app.topic(
        settings.results_topic,
        settings.feedback_topic,
        key_type=bytes,
        value_type=bytes,
    )

    async def publish(emit: Emit, source: SourceRecord) -> None:
        if emit.kind == "training":
            metrics.feedback_score.observe(emit.record["score"])
            value = codec.encode("TrainingExample", emit.record)
            await app.producer.send_and_wait(
                settings.training_topic, emit.key, value, None, None, None
            )
            return
        feedback = emit.record.get("feedback")
        original, offset = source.value, source.offset
        if feedback is not None:  # re-encode: the dead letter may be decided much later
            original = codec.encode("FeedbackEvent", feedback)
            offset = emit.record.get("source_offset") or offset
        letter = dead_letter(
            SourceRecord(
                source.tp,
                settings.feedback_topic,
                source.partition,
                offset,
                emit.key,
                original,
                source.timestamp_ms,
            ),
            emit.record["reason_code"],
            emit.record["reason"],
            request_id=emit.record.get("request_id"),
            worker=settings.worker_id,
        )
        await app.producer.send_and_wait(
            settings.feedback_dlq_topic,
            emit.key,
            codec.encode("DeadLetter", letter),
            None,
            None,
            None,
        )

    async def join(stream: faust.StreamT) -> None:
        async for event in stream.events():
            source = _source_record(event.message)
            emits = _join_one(joiner, codec, settings, source)
            emits.extend(joiner.sweep(source.partition))
            for emit in emits:
                await publish(emit, source)

    app.agent(results_and_feedback, name="sluice.feedback-join")(join)
    app.agent(requests_channel(app, settings), name="sluice.feedback-join-requests")(join)


def _join_one(joiner: Any, codec: Any, settings: Settings, source: SourceRecord) -> list[Any]:
    from schemas.errors import SchemaError
    from streams.feedback import Emit

    if source.topic == settings.feedback_topic:
        try:
            _, record = codec.decode(source.value, expected="FeedbackEvent")
        except SchemaError as exc:
            joiner.count(f"dlq:{exc.reason_code}")
            return [
                Emit(
                    "dlq",
                    source.key,
                    {
                        "reason_code": exc.reason_code,
                        "reason": str(exc),
                        "request_id": None,
                        "feedback": None,
                    },
                )
            ]
        record["_offset"] = source.offset
        return joiner.on_feedback(source.partition, source.timestamp_ms, record)
    expected = "InferenceResult" if source.topic == settings.results_topic else "InferenceRequest"
    try:
        _, record = codec.decode(source.value, expected=expected)
    except SchemaError:
        return []  # the intake dead-letters bad requests; results are ours
    if expected == "InferenceResult":
        return joiner.on_result(source.partition, source.timestamp_ms, record)
    return joiner.on_request(source.partition, source.timestamp_ms, record)
