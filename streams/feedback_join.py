"""The feedback join agent: requests, results and feedback in, training examples out.

The join itself is a pure state machine (:class:`streams.feedback.FeedbackJoiner`); this
module wires it to Faust: a changelog-backed table, two agents (the requests topic has its
own, acks-off channel, see :func:`streams.app.requests_channel`) and the producer.
"""

from __future__ import annotations

from typing import Any

import faust

from schemas.codec import AvroCodec
from schemas.errors import SchemaError
from streams.feedback import Emit, FeedbackJoiner
from streams.metrics import WorkerMetrics
from streams.records import SourceRecord, dead_letter, source_record
from streams.redaction import Redactor
from streams.settings import Settings


def add_feedback_join(
    app: faust.App,
    settings: Settings,
    codec: AvroCodec,
    metrics: WorkerMetrics,
    requests: faust.TopicT,
) -> None:
    """The agent that joins requests, results and feedback into training examples."""
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
            source = source_record(event.message)
            emits = _join_one(joiner, codec, settings, source)
            emits.extend(joiner.sweep(source.partition))
            for emit in emits:
                await publish(emit, source)

    app.agent(results_and_feedback, name="sluice.feedback-join")(join)
    app.agent(requests, name="sluice.feedback-join-requests")(join)


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
