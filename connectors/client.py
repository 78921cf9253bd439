"""The Python client: publish prompts, await their results, iterate over results.

    async with SluiceClient(settings) as client:
        request_id = await client.publish("What is Kafka?", max_new_tokens=32)
        result = await client.result(request_id, timeout=60)
        print(result["text"])

The client watches ``llm.results`` (and the dead-letter topic) from the moment it starts:
``result()`` finds results that arrived after ``start()``, also those that arrived before
``result()`` was called. A request that was dead-lettered raises :class:`RequestRejected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.codec import AvroCodec
from schemas.errors import RegistryError, SchemaError, SluiceError
from streams.bootstrap import resolve_bootstrap
from streams.codecs import codec_from_settings
from streams.kafka_clients import stop_consumer, topic_partitions
from streams.settings import Settings

logger = logging.getLogger(__name__)


class ClientError(SluiceError):
    """Base of client errors."""


class RequestRejected(ClientError):
    """The worker dead-lettered the request; ``dead_letter`` says why."""

    def __init__(self, dead_letter: Mapping[str, Any]) -> None:
        super().__init__(
            f"request {dead_letter.get('request_id')} was rejected: "
            f"[{dead_letter['reason_code']}] {dead_letter['reason']}",
            reason_code=dead_letter["reason_code"],
        )
        self.dead_letter = dict(dead_letter)


class SluiceClient:
    """Producer of ``InferenceRequest`` and watcher of ``InferenceResult``."""

    def __init__(
        self,
        settings: Settings,
        *,
        bootstrap: str | None = None,
        codec: AvroCodec | None = None,
        remember: int = 100_000,
    ) -> None:
        self.settings = settings
        self._bootstrap = bootstrap
        self.codec = codec or codec_from_settings(settings)
        self._remember = remember
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, dict[str, Any] | RequestRejected] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._subscribers: list[asyncio.Queue[dict[str, Any]]] = []

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> SluiceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def bootstrap(self) -> str:
        if self._bootstrap is None:
            self._bootstrap = resolve_bootstrap(self.settings)
        return self._bootstrap

    async def start(self, *, watch_results: bool = True) -> None:
        opts = self.settings.kafka_client_options()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=2, **opts
        )
        await self._producer.start()
        if watch_results:
            await self._start_watching(opts)

    async def _start_watching(self, opts: dict[str, Any]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False, **opts
        )
        await consumer.start()
        tps = []
        for topic in (self.settings.results_topic, self.settings.dlq_topic):
            parts = await topic_partitions(consumer, topic)
            if not parts:
                await stop_consumer(consumer)
                raise ClientError(
                    f"topic {topic} does not exist: start a worker or `sluice kafka up`"
                )
            tps.extend(TopicPartition(topic, p) for p in parts)
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now, so nothing published after start is missed
            await consumer.position(tp)
        self._consumer = consumer
        self._reader = asyncio.create_task(self._read(), name="sluice-client-results")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._consumer is not None:
            await stop_consumer(self._consumer)
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    # -- publishing --------------------------------------------------------------------
    def build_request(
        self,
        prompt: str,
        *,
        request_id: str | None = None,
        model: str = "default",
        system: str | None = None,
        raw: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Iterable[str] = (),
        seed: int | None = None,
        priority: int = 0,
        deadline_ms: int | None = None,
        tenant: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """An ``InferenceRequest`` record with defaults filled in."""
        return {
            "request_id": request_id or uuid.uuid4().hex,
            "model": model,
            "prompt": prompt,
            "system": system,
            "raw": raw,
            "sampling": {
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "stop": list(stop),
                "seed": seed,
            },
            "priority": priority,
            "deadline_ms": deadline_ms,
            "tenant": tenant,
            "created_at": int(time.time() * 1000),
            "metadata": dict(metadata or {}),
        }

    async def publish(self, prompt: str, **fields: Any) -> str:
        """Publish one prompt (fields as in :meth:`build_request`). Returns its request_id
        once the broker has acknowledged it."""
        record = self.build_request(prompt, **fields)
        await self.publish_record(record)
        return record["request_id"]

    async def publish_record(self, record: Mapping[str, Any], *, wait: bool = True) -> Any:
        """Publish a full ``InferenceRequest`` record, keyed by its request_id."""
        producer = self._require_producer()
        value = self.codec.encode("InferenceRequest", record)
        key = record["request_id"].encode()
        if wait:
            return await producer.send_and_wait(self.settings.requests_topic, value, key=key)
        return await producer.send(self.settings.requests_topic, value, key=key)

    async def send_feedback(
        self,
        request_id: str,
        score: int,
        *,
        label: str | None = None,
        correction: str | None = None,
        user: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Publish a ``FeedbackEvent`` (score -1, 0 or +1) for an answered request."""
        if score not in (-1, 0, 1):
            raise ClientError(f"score must be -1, 0 or 1, not {score!r}")
        if not request_id:
            raise ClientError("request_id is empty")
        record = {
            "request_id": request_id,
            "score": score,
            "label": label,
            "correction": correction,
            "user": user,
            "created_at": int(time.time() * 1000),
            "metadata": dict(metadata or {}),
        }
        await self._require_producer().send_and_wait(
            self.settings.feedback_topic,
            self.codec.encode("FeedbackEvent", record),
            key=request_id.encode(),
        )

    async def send_control(
        self,
        command: str,
        *,
        model: str,
        version: str | None = None,
        percent: int | None = None,
        issued_by: str | None = None,
        evidence: str | None = None,
    ) -> str:
        """Publish a rollout ``ControlCommand`` (LOAD, CANARY, PROMOTE, ROLLBACK) that
        every worker applies, signed with ``control_signing_key`` when it is set
        (:mod:`streams.control_auth`). Returns its command_id. ``evidence``: what an
        automatic decision rests on (compact JSON, ``streams.canary.evidence_json``)."""
        from streams.control_auth import control_keys

        record = {
            "command_id": uuid.uuid4().hex,
            "command": command.upper(),
            "model": model,
            "version": version,
            "percent": percent,
            "issued_by": issued_by,
            "created_at": int(time.time() * 1000),
            "evidence": evidence,
        }
        value = self.codec.encode("ControlCommand", record)
        await self._require_producer().send_and_wait(
            self.settings.control_topic,
            value,
            key=model.encode(),
            headers=control_keys(self.settings).sign(value) or None,
        )
        return record["command_id"]

    async def flush(self) -> None:
        await self._require_producer().flush()

    def _require_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise ClientError("client not started: use `async with SluiceClient(...)`")
        return self._producer

    # -- results -----------------------------------------------------------------------
    async def result(self, request_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The result for ``request_id``; raises RequestRejected if it was dead-lettered,
        TimeoutError after ``timeout`` seconds."""
        if self._consumer is None:
            raise ClientError("client is not watching results (start(watch_results=True))")
        seen = self._seen.get(request_id)
        if seen is None:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(request_id, []).append(future)
            try:
                return await asyncio.wait_for(future, timeout)
            finally:
                waiters = self._waiters.get(request_id, [])
                if future in waiters:
                    waiters.remove(future)
                if not waiters:
                    self._waiters.pop(request_id, None)
        if isinstance(seen, RequestRejected):
            raise seen
        return seen

    async def results(self) -> AsyncIterator[dict[str, Any]]:
        """Every result that arrives from now on (dead letters are not included)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    self._dispatch(tp.topic, record.value)

    def _dispatch(self, topic: str, value: bytes | None) -> None:
        try:
            name, record = self.codec.decode(value)
        except (SchemaError, RegistryError) as exc:
            logger.warning("undecodable record on %s: %s", topic, exc)
            return
        if name == "DeadLetter":
            request_id = record.get("request_id")
            if not request_id:
                return
            outcome: dict[str, Any] | RequestRejected = RequestRejected(record)
        elif name == "InferenceResult":
            request_id, outcome = record["request_id"], record
            for queue in self._subscribers:
                queue.put_nowait(record)
        else:
            return
        if request_id in self._seen:  # a duplicate answer: the first one stands
            return
        self._seen[request_id] = outcome
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        for future in self._waiters.pop(request_id, []):
            if future.done():
                continue
            if isinstance(outcome, RequestRejected):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
