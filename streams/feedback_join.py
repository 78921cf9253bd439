"""The feedback join agent: requests, results and feedback in, training examples out.

The join itself is a pure state machine (:class:`streams.feedback.FeedbackJoiner`); this
module wires it to Faust: a changelog-backed table, two agents (the requests topic has its
own, acks-off channel, see :func:`streams.app.requests_channel`), the producer, and the
table's recovery hook that rebuilds the joiner's timers (``docs/feedback-join.md``).
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from aiokafka.partitioner import murmur2

from schemas.codec import AvroCodec
from schemas.errors import SchemaError
from streams.feedback import Emit, FeedbackJoiner
from streams.metrics import WorkerMetrics
from streams.records import SourceRecord, dead_letter, source_record
from streams.redaction import Pseudonymizer, Redactor
from streams.settings import Settings
from streams.topics import changelog_configs

logger = logging.getLogger(__name__)


def table_name(settings: Settings) -> str:
    """The join table's name."""
    return f"{settings.app_id}-feedback-join"


def changelog_topic(settings: Settings) -> str:
    """The join table's changelog topic (Faust's naming: ``<app id>-<table>-changelog``)."""
    return f"{settings.app_id}-{table_name(settings)}-changelog"


def add_feedback_join(
    app: faust.App,
    settings: Settings,
    codec: AvroCodec,
    metrics: WorkerMetrics,
    requests: faust.TopicT,
) -> None:
    """The agent that joins requests, results and feedback into training examples."""
    table = app.Table(
        table_name(settings),
        default=None,
        partitions=settings.partitions,  # co-partitioned with the three topics
        extra_topic_configs=changelog_configs(settings),  # tombstones clear (topics.py)
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
        max_entry_bytes=settings.feedback_max_entry_bytes,
        clock_skew_ms=settings.feedback_clock_skew_ms,
        on_outcome=on_outcome,
        pseudonymize=Pseudonymizer.from_settings(settings).pseudonym,
    )

    @table.on_recover
    async def rebuild_timers() -> None:
        # Faust calls this after every rebalance, once the table holds what the
        # changelog had, before the stream partitions resume. Reads only: the table
        # cannot be written outside an agent's iteration.
        owned = {
            tp.partition
            for tp in app.assignor.assigned_actives()
            if tp.topic == table.changelog_topic_name
        }
        foreign = joiner.rebuild(owned, partition_of=_default_partition(settings.partitions))
        for key in foreign:  # another worker's now: drop the local copy (no tombstone)
            table.data.pop(key, None)

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
        letter = dead_letter(
            _feedback_source(emit, source, codec, settings),
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
            source = source_record(event.message)
            emits = _join_one(joiner, codec, settings, source)
            emits.extend(joiner.sweep(source.partition))
            for emit in emits:
                await publish(emit, source)

    app.agent(results_and_feedback, name="sluice.feedback-join")(join)
    app.agent(requests, name="sluice.feedback-join-requests")(join)


def _feedback_source(
    emit: Emit, source: SourceRecord, codec: AvroCodec, settings: Settings
) -> SourceRecord:
    """Where a feedback dead letter's record came from. A letter decided later (a sweep
    while another record is read) names the feedback's own partition and offset and
    carries the feedback re-encoded; one decided on reading it carries its bytes."""
    offset = emit.record.get("source_offset")
    partition = emit.record.get("source_partition", source.partition)
    feedback = emit.record.get("feedback")
    is_current = source.topic == settings.feedback_topic and (
        offset is None or (offset == source.offset and partition == source.partition)
    )
    if is_current or feedback is None:
        return SourceRecord(
            source.tp,
            settings.feedback_topic,
            source.partition,
            source.offset,
            emit.key,
            source.value,
            source.timestamp_ms,
        )
    try:
        original: bytes | None = codec.encode("FeedbackEvent", feedback)
    except Exception:  # a stored value the schema no longer takes: keep the letter
        logger.exception("feedback join: cannot re-encode parked feedback %r", emit.key)
        original = None
    return SourceRecord(
        source.tp,
        settings.feedback_topic,
        int(partition),
        int(offset) if offset is not None else -1,
        emit.key,
        original,
        source.timestamp_ms,
    )


def _default_partition(partitions: int) -> Any:
    """Kafka's default partitioner (murmur2 of the key), for entries stored before the
    table recorded each entry's partition."""

    def partition_of(rid: str) -> int:
        return (murmur2(rid.encode()) & 0x7FFFFFFF) % partitions

    return partition_of


def _join_one(joiner: Any, codec: Any, settings: Settings, source: SourceRecord) -> list[Any]:
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
