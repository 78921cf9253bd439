"""The outbox's policy by error kind, with plain values and a fake producer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from streams.log_limits import RateLimitedLogger, RepeatFilter
from streams.outbox import (
    Outbox,
    Outgoing,
    RetryPolicy,
    SendErrorKind,
    Step,
    classify,
    next_step,
)


class ProducerSendError(Exception):
    """Faust wraps the client's error like this (the cause carries it)."""


def _wrapped(error: Exception) -> Exception:
    try:
        raise ProducerSendError(f"Error while sending: {error!r}") from error
    except ProducerSendError as wrapped:
        return wrapped


def test_classify_looks_through_wrappers() -> None:
    assert classify(_wrapped(MessageSizeTooLargeError())) is SendErrorKind.TOO_LARGE
    assert classify(_wrapped(TopicAuthorizationFailedError())) is SendErrorKind.FORBIDDEN
    assert classify(UnknownTopicOrPartitionError()) is SendErrorKind.UNKNOWN_TOPIC
    assert classify(_wrapped(KafkaConnectionError())) is SendErrorKind.TRANSIENT
    assert classify(TimeoutError()) is SendErrorKind.TRANSIENT


@pytest.mark.parametrize(
    ("kind", "dead_letter", "shrink", "attempts", "step"),
    [
        (SendErrorKind.TRANSIENT, False, False, 100, Step.RETRY),
        (SendErrorKind.TOO_LARGE, True, True, 1, Step.SHRINK),
        (SendErrorKind.TOO_LARGE, True, False, 2, Step.RETRY),
        (SendErrorKind.TOO_LARGE, False, False, 1, Step.GIVE_UP),
        (SendErrorKind.FORBIDDEN, False, False, 1, Step.GIVE_UP),
        (SendErrorKind.FORBIDDEN, True, False, 1, Step.RETRY),
        (SendErrorKind.UNKNOWN_TOPIC, False, False, 3, Step.RETRY),
        (SendErrorKind.UNKNOWN_TOPIC, False, False, 12, Step.GIVE_UP),
        (SendErrorKind.UNKNOWN_TOPIC, True, False, 50, Step.RETRY),
    ],
)
def test_next_step(kind, dead_letter, shrink, attempts, step) -> None:  # type: ignore[no-untyped-def]
    got = next_step(
        kind,
        is_dead_letter=dead_letter,
        can_shrink=shrink,
        attempts=attempts,
        policy=RetryPolicy(),
    )
    assert got is step


class SizeLimitedProducer:
    """Refuses values over ``limit`` bytes at send time, as aiokafka does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.written: list[bytes] = []

    async def send(self, topic, key, value, partition, timestamp, headers):  # type: ignore[no-untyped-def]
        if len(value) > self.limit:
            raise _wrapped(MessageSizeTooLargeError(f"{len(value)} bytes"))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        self.written.append(value)
        return future


async def test_too_large_dead_letters_shrink_and_results_are_given_up() -> None:
    delivered: list[Outgoing] = []
    undeliverable: list[Outgoing] = []
    outbox = Outbox(delivered.append, lambda item, _e: undeliverable.append(item))
    producer = SizeLimitedProducer(limit=100)
    task = asyncio.create_task(outbox.run(producer))
    try:
        outbox.put(
            Outgoing("dlq", b"k", b"x" * 500, [], is_dead_letter=True, shrink=lambda: b"y" * 50)
        )
        outbox.put(Outgoing("results", b"k", b"z" * 500, [], request_id="r1"))
        for _ in range(50):
            await asyncio.sleep(0.01)
            if delivered and undeliverable:
                break
    finally:
        task.cancel()
    assert [item.value for item in delivered] == [b"y" * 50]
    assert [item.request_id for item in undeliverable] == ["r1"]
    assert producer.written == [b"y" * 50]


def test_repeat_filter_passes_one_line_per_kind_per_interval() -> None:
    now = [0.0]
    repeat = RepeatFilter(interval_s=10.0, clock=lambda: now[0])

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        return logging.LogRecord("aiokafka", level, __file__, 1, msg, None, None)

    passed = 0
    for _ in range(500):  # 50 lines a second for 10 s
        passed += repeat.filter(record("Unable connect to node with id %s"))
        now[0] += 0.02
    assert passed == 1
    late = record("Unable connect to node with id %s")
    now[0] += 0.1
    assert repeat.filter(late) and "499 similar lines suppressed" in late.msg
    assert repeat.filter(record("debug line", logging.DEBUG))  # low levels untouched


def test_rate_limited_logger(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLogger(logging.getLogger("t"), interval_s=5.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        assert log.warning("k", "send failed %d", 1)
        assert not log.warning("k", "send failed %d", 2)
        assert log.warning("other", "another kind")
        now[0] = 6.0
        assert log.warning("k", "send failed %d", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "send failed 1",
        "another kind",
        "send failed 3 [1 similar suppressed]",
    ]
