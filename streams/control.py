"""Every worker reads ``llm.control`` in full, without a consumer group.

A consumer group would split the topic between workers; rollout commands must reach all of
them. At start a worker reads the topic to its end and folds every command into one
:class:`~streams.rollout.RolloutState` (so it serves what operators last asked for before
it takes any request, and loads only the versions that state needs, however many LOADs
the history holds), then follows the topic and applies each new command as it comes.
The CLI reads the topic the same way (:func:`read_rollout`) to show and check the state.

With ``keys`` that require signatures (:mod:`streams.control_auth`), a command that is
unsigned, signed by an unknown key id or with a bad signature is ignored, both in the fold
and live: counted (``on_rejected(reason)``, the worker's
``sluice_control_rejected_total{reason}``) and logged as a rate-limited warning.
See ``docs/rollout.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.codec import AvroCodec
from schemas.errors import SchemaError, SluiceError
from schemas.registry import adecode
from streams.control_auth import ControlKeys
from streams.kafka_clients import stop_consumer, topic_partitions
from streams.log_limits import RateLimitedLogger
from streams.rollout import RolloutState

logger = logging.getLogger(__name__)

Apply = Callable[[dict[str, Any]], Awaitable[None]]
Adopt = Callable[[RolloutState], Awaitable[None]]
OnRejected = Callable[[str], None]

#: How often a listener whose topic did not exist at catch-up looks for it again.
_TOPIC_RECHECK_S = 5.0


class ControlTopicError(SluiceError):
    """The control topic could not be read to its end."""

    reason_code = "control_topic_unreadable"
    retriable = True


def announce_keys(keys: ControlKeys, topic: str) -> None:
    """Say once, at start, whether control commands are authenticated: a warning when no
    key is configured (every command is then accepted), the trusted key ids otherwise."""
    if keys.required:
        logger.info(
            "control commands on %s: only those signed with key id %s are applied",
            topic,
            " or ".join(sorted(keys.trusted)),
        )
    else:
        logger.warning(
            "control commands on %s are not authenticated: any principal that may write the "
            "topic changes what this worker serves (set SLUICE_CONTROL_SIGNING_KEY)",
            topic,
        )


class ControlListener:
    """Reads the control topic: folds its history at :meth:`catch_up`, then applies each
    new ``ControlCommand`` in order, exactly once each (:meth:`run`).

    ``apply(command)`` handles each live command. ``adopt(state)``, if given, is called
    once at the end of :meth:`catch_up` with the fold of everything read; without it the
    history is applied command by command through ``apply``.

    ``keys`` (default: none, every command accepted) decides which commands are trusted;
    ``on_rejected(reason)`` is told of each one ignored for its signature.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        codec: AvroCodec,
        apply: Apply,
        client_options: dict[str, Any] | None = None,
        *,
        adopt: Adopt | None = None,
        keys: ControlKeys | None = None,
        on_rejected: OnRejected | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._codec = codec
        self._apply = apply
        self._adopt = adopt
        self._options = client_options or {}
        self._keys = keys or ControlKeys()
        self._on_rejected = on_rejected
        self._warn = RateLimitedLogger(logger)
        self._consumer: AIOKafkaConsumer | None = None
        self._assigned = False
        #: Commands read (folded at catch-up or applied live).
        self.applied = 0
        #: Commands ignored for their signature, by reason.
        self.rejected: dict[str, int] = {}
        #: The fold of the commands read at catch-up (kept up to date only with ``adopt``).
        self.state = RolloutState()
        #: Whether the topic existed at catch-up (None before it).
        self.topic_exists: bool | None = None
        #: Whether catch-up reached the end offsets it saw at its start.
        self.complete = False

    async def catch_up(self, timeout: float = 60.0) -> int:
        """Read every command already on the topic; fold them and ``adopt`` the result
        (or apply them one by one without ``adopt``). Returns how many were read.

        If the end is not reached within ``timeout`` s the fold so far is adopted and
        the rest is applied live by :meth:`run` (logged as an error)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            **self._options,
        )
        await consumer.start()
        self._consumer = consumer
        tps = await self._assign(consumer)
        self.topic_exists = bool(tps)
        if not tps:
            logger.warning("control topic %s does not exist; no rollout commands", self._topic)
            self.complete = True
        else:
            ends = await consumer.end_offsets(tps)
            loop = asyncio.get_running_loop()
            give_up = loop.time() + timeout
            while True:
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= ends[tp] for tp in tps):
                    self.complete = True
                    break
                if loop.time() >= give_up:
                    logger.error(
                        "control topic %s not read to its end within %.0f s (%d commands "
                        "read); the rest is applied as it arrives",
                        self._topic,
                        timeout,
                        self.applied,
                    )
                    break
                await self._poll(consumer, 500, folding=self._adopt is not None)
        if self._adopt is not None:
            logger.info("control: %d commands fold to %s", self.applied, self.state)
            await self._adopt(self.state)
        return self.applied

    async def run(self) -> None:
        """Follow the topic until cancelled."""
        if self._consumer is None:
            await self.catch_up()
        assert self._consumer is not None
        while True:
            if not self._assigned:
                await asyncio.sleep(_TOPIC_RECHECK_S)
                await self._assign(self._consumer)
                continue
            await self._poll(self._consumer, 1000, folding=False)

    async def _assign(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """Assign every partition of the topic from its beginning ([] if it is missing)."""
        tps = [
            TopicPartition(self._topic, p) for p in await topic_partitions(consumer, self._topic)
        ]
        if tps:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._assigned = True
        return tps

    async def _poll(self, consumer: AIOKafkaConsumer, timeout_ms: int, *, folding: bool) -> None:
        batches = await consumer.getmany(timeout_ms=timeout_ms)
        for records in batches.values():
            for record in records:
                try:
                    _, command = await adecode(self._codec, record.value, expected="ControlCommand")
                except SchemaError as exc:
                    logger.warning(
                        "skipping undecodable control record @%d: %s", record.offset, exc
                    )
                    continue
                verdict = self._keys.verify(record.value, record.headers or ())
                if not verdict.ok:
                    self._reject(command, record.offset, verdict.reason or "?", verdict.key_id)
                    continue
                logger.info("control: %s %s", command["command"], command)
                if folding:
                    self.state = self.state.apply(command)
                else:
                    await self._apply(command)
                self.applied += 1

    def _reject(
        self, command: dict[str, Any], offset: int, reason: str, key_id: str | None
    ) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._on_rejected is not None:
            self._on_rejected(reason)
        self._warn.warning(
            f"control-rejected:{reason}",
            "ignoring control command %s (%s @%d, key id %s): %s; only commands signed "
            "with a trusted key are applied",
            command.get("command_id"),
            command.get("command"),
            offset,
            key_id,
            reason,
        )

    async def stop(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None
            self._assigned = False


@dataclass(frozen=True)
class ControlLog:
    """What the control topic says: the folded state and how many commands made it."""

    state: RolloutState
    commands: int
    topic_exists: bool
    #: Commands ignored for their signature, by reason (see :mod:`streams.control_auth`).
    rejected: Mapping[str, int] = field(default_factory=dict)


async def read_rollout(
    bootstrap: str,
    topic: str,
    codec: AvroCodec,
    client_options: dict[str, Any] | None = None,
    *,
    timeout: float = 30.0,
    keys: ControlKeys | None = None,
) -> ControlLog:
    """Fold the whole control topic, as a worker does at start (commands ``keys`` does not
    trust ignored, as workers ignore them). Raises :class:`ControlTopicError` if its end
    is not reached within ``timeout`` s."""
    folded: list[RolloutState] = []

    async def adopt(state: RolloutState) -> None:
        folded.append(state)

    async def refuse(command: dict[str, Any]) -> None:  # never called: adopt folds all
        raise AssertionError(f"unexpected live command {command}")

    listener = ControlListener(
        bootstrap, topic, codec, refuse, client_options, adopt=adopt, keys=keys
    )
    try:
        count = await listener.catch_up(timeout)
    finally:
        await listener.stop()
    if not listener.complete:
        raise ControlTopicError(
            f"could not read {topic} on {bootstrap} to its end within {timeout:.0f} s"
        )
    return ControlLog(folded[-1], count, bool(listener.topic_exists), dict(listener.rejected))
