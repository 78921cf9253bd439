"""The outbox: every result and dead letter the worker writes, until the broker has it.

An item leaves the outbox only through its delivery callback: ``on_delivered`` when the
broker acknowledged it, ``on_undeliverable`` when it never can be (then the pipeline
answers its request another way: a result that cannot be written becomes a dead letter).
What to do after a failed send is decided by the pure function :func:`next_step` from the
error's kind, so the policy is tested against plain values:

* **too large** (the record exceeds the producer's or the broker's size limit): a dead
  letter is shrunk (its copy of the original value is cut down to a prefix, with the
  original size and SHA-256 kept) and sent again; a result is undeliverable;
* **forbidden** (authorization, invalid topic) or **gone** (unknown topic after many
  tries): a result is undeliverable; a dead letter has nowhere else to go and is retried
  with capped backoff, loudly (metric and rate-limited log), so nothing is lost;
* anything else (broker unreachable, leader moving, timeouts) is **transient**: retried
  with capped exponential backoff, for as long as it takes.

While an item waits, its source offsets stay unfinished, so nothing past them is committed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streams.log_limits import RateLimitedLogger
from streams.records import SourceRecord

logger = logging.getLogger(__name__)


class Producer(Protocol):
    """What the outbox needs from a Kafka producer (Faust's and aiokafka's both fit)."""

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]: ...


class SendErrorKind(enum.Enum):
    TRANSIENT = "transient"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    UNKNOWN_TOPIC = "unknown_topic"


_TOO_LARGE = {"MessageSizeTooLargeError", "RecordListTooLargeError", "RecordTooLargeError"}
_FORBIDDEN = {
    "TopicAuthorizationFailedError",
    "ClusterAuthorizationFailedError",
    "TransactionalIdAuthorizationFailed",
    "InvalidTopicError",
    "PolicyViolationError",
}
_UNKNOWN_TOPIC = {"UnknownTopicOrPartitionError"}


def classify(error: BaseException) -> SendErrorKind:
    """The kind of a send failure, looking through wrappers (Faust's ``ProducerSendError``
    carries the client's error as its cause)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & _TOO_LARGE:
            return SendErrorKind.TOO_LARGE
        if names & _FORBIDDEN:
            return SendErrorKind.FORBIDDEN
        if names & _UNKNOWN_TOPIC:
            return SendErrorKind.UNKNOWN_TOPIC
        current = current.__cause__ or current.__context__
    return SendErrorKind.TRANSIENT


class Step(enum.Enum):
    RETRY = "retry"
    SHRINK = "shrink"  # rebuild the record smaller, then retry
    GIVE_UP = "give_up"  # undeliverable: answer the request another way


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.1
    max_s: float = 10.0
    unknown_topic_attempts: int = 12  # about a minute of backoff before a topic counts as gone

    def delay(self, attempts: int) -> float:
        return min(self.base_s * 2 ** min(max(attempts - 1, 0), 16), self.max_s)


def next_step(
    kind: SendErrorKind,
    *,
    is_dead_letter: bool,
    can_shrink: bool,
    attempts: int,
    policy: RetryPolicy,
) -> Step:
    """What to do with an item whose ``attempts``-th send failed with ``kind``."""
    if kind is SendErrorKind.TOO_LARGE:
        if can_shrink:
            return Step.SHRINK
        return Step.RETRY if is_dead_letter else Step.GIVE_UP
    if kind is SendErrorKind.FORBIDDEN:
        return Step.RETRY if is_dead_letter else Step.GIVE_UP
    if kind is SendErrorKind.UNKNOWN_TOPIC and attempts >= policy.unknown_topic_attempts:
        return Step.RETRY if is_dead_letter else Step.GIVE_UP
    return Step.RETRY


@dataclass
class Outgoing:
    """One record to publish and the source records it answers."""

    topic: str
    key: bytes | None
    value: bytes
    sources: list[SourceRecord]
    request_id: str | None = None  # the request it answers, when known (answered index)
    is_dead_letter: bool = False
    #: Builds a smaller value (dead letters: a shorter copy of the original); None: cannot.
    shrink: Callable[[], bytes | None] | None = None
    attempts: int = 0
    first_try: float = field(default_factory=time.monotonic)


Delivered = Callable[[Outgoing], None]
Undeliverable = Callable[[Outgoing, BaseException], None]


class Outbox:
    """Publishes items in order of arrival, retries by policy, reports each item's end."""

    def __init__(
        self,
        on_delivered: Delivered,
        on_undeliverable: Undeliverable,
        *,
        metrics: Any = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._on_delivered = on_delivered
        self._on_undeliverable = on_undeliverable
        self._metrics = metrics
        self.policy = policy or RetryPolicy()
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()
        self._producer: Producer | None = None
        self._waiting = 0  # items in backoff
        self._log = RateLimitedLogger(logger, interval_s=10.0)

    @property
    def pending(self) -> int:
        """Items queued or waiting to be retried."""
        return self._queue.qsize() + self._waiting

    def put(self, item: Outgoing) -> None:
        self._queue.put_nowait(item)

    async def run(self, producer: Producer) -> None:
        """Send until cancelled."""
        self._producer = producer
        while True:
            item = await self._queue.get()
            try:
                delivery = await producer.send(item.topic, item.key, item.value, None, None, None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(item, exc)
                continue
            asyncio.ensure_future(delivery).add_done_callback(
                lambda f, item=item: self._on_delivery(item, f)
            )

    def _on_delivery(self, item: Outgoing, delivery: asyncio.Future[Any]) -> None:
        if delivery.cancelled():
            self._failed(item, RuntimeError("send cancelled"))
            return
        error = delivery.exception()
        if error is not None:
            self._failed(item, error)
            return
        self._on_delivered(item)

    def _failed(self, item: Outgoing, error: BaseException) -> None:
        item.attempts += 1
        kind = classify(error)
        step = next_step(
            kind,
            is_dead_letter=item.is_dead_letter,
            can_shrink=item.shrink is not None,
            attempts=item.attempts,
            policy=self.policy,
        )
        if self._metrics is not None:
            self._metrics.publish_retries_total.inc()
        if step is Step.GIVE_UP:
            logger.warning(
                "giving up on sending to %s after %d tries (%s: %s)",
                item.topic,
                item.attempts,
                kind.value,
                error,
            )
            self._on_undeliverable(item, error)
            return
        if step is Step.SHRINK:
            assert item.shrink is not None
            smaller = item.shrink()
            item.shrink = None  # one shrink: what is left is as small as it gets
            if smaller is not None:
                logger.warning(
                    "record for %s too large (%d bytes): sending a shortened copy (%d bytes)",
                    item.topic,
                    len(item.value),
                    len(smaller),
                )
                item.value = smaller
                self._queue.put_nowait(item)
                return
        delay = self.policy.delay(item.attempts)
        self._log.warning(
            f"send:{item.topic}:{kind.value}",
            "send to %s failed (%s: %s); retry %d in %.1fs",
            item.topic,
            kind.value,
            error,
            item.attempts,
            delay,
        )
        self._waiting += 1
        asyncio.get_running_loop().call_later(delay, self._requeue, item)

    def _requeue(self, item: Outgoing) -> None:
        self._waiting -= 1
        self._queue.put_nowait(item)
