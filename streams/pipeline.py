"""The intake pipeline: raw Kafka records in, results and dead letters out, offsets committed.

The Faust agent hands every record to :meth:`IntakePipeline.handle`; nothing else in the
agent. Here a record is decoded, checked against the answered index, admitted, queued in
the micro-batcher and, when its outcome is ready, published. Its offset is marked finished
only when the broker has acknowledged its result or dead letter; a commit loop moves each
partition's committed offset up to its lowest unfinished offset (:mod:`streams.watermarks`).
So a crash at any point loses nothing: what was not committed is read again, and what was
already answered is recognised by request_id and not answered twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from inference.backends.base import Engine
from inference.batcher import MicroBatcher
from inference.errors import InvalidRequestError
from inference.inflight import InflightDispatcher
from inference.types import BatchOutcome, Completion, GenerationRequest
from schemas.codec import AvroCodec
from schemas.errors import SchemaError
from streams.admission import Admission, AdmissionLimits
from streams.control import ControlListener
from streams.dedup import AnsweredIndex
from streams.holes import HoleReader
from streams.metrics import WorkerMetrics
from streams.records import SourceRecord, dead_letter, now_ms, result_record
from streams.rollout import Dispatcher, ModelRouter, Route
from streams.settings import Settings
from streams.watermarks import OffsetWatermarks

logger = logging.getLogger(__name__)

Committer = Callable[[dict[Hashable, int]], Awaitable[bool]]
Highwater = Callable[[Hashable], int | None]


class Producer(Protocol):
    """What the pipeline needs from a Kafka producer (Faust's and aiokafka's both fit)."""

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
    ) -> Awaitable[Any]: ...


@dataclass
class _Outgoing:
    """One record to publish and the source records it answers."""

    topic: str
    key: bytes | None
    value: bytes
    sources: list[SourceRecord]
    request_id: str | None = None  # set for results: goes into the answered index
    attempts: int = 0
    on_delivered: list[Callable[[], None]] = field(default_factory=list)


class _Context(NamedTuple):
    request_id: str
    created_ms: int
    read_ms: int
    engine: Engine


class IntakePipeline:
    """Everything between a raw ``llm.requests`` record and its published answer."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        codec: AvroCodec,
        metrics: WorkerMetrics,
        answered: AnsweredIndex,
        load_version: Callable[[str], Awaitable[Engine]] | None = None,
    ) -> None:
        """``engine`` is the base model (started); ``load_version`` loads (and starts) a
        registry version when a rollout command asks for one."""
        self.settings = settings
        self.engine = engine
        self.codec = codec
        self.metrics = metrics
        self.answered = answered
        self.watermarks = OffsetWatermarks()
        self._load_version = load_version
        self.control: ControlListener | None = None
        self.holes: HoleReader | None = None  # None: skipped offsets are not checked
        self._repairs: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped on every revocation: repairs from before are void
        self.admission = Admission(
            AdmissionLimits(
                settings.max_prompt_chars,
                settings.max_prompt_tokens,
                settings.max_new_tokens_limit,
            ),
            served_models=lambda: {engine.model_name},
            encode=lambda p, s, r: self.router.current.engine.encode_prompt(p, system=s, raw=r),
        )
        self.router = ModelRouter(Route(None, engine, self._dispatcher_for(engine)), self._route)
        self._slots = asyncio.Semaphore(settings.max_inflight)
        self._inflight: dict[str, list[SourceRecord]] = {}
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._producer: Producer | None = None
        self._committer: Committer | None = None
        self._highwater: Highwater | None = None
        self._positions: dict[Hashable, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._unfinished = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.ready = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(
        self, producer: Producer, committer: Committer, highwater: Highwater | None = None
    ) -> None:
        self._producer = producer
        self._committer = committer
        self._highwater = highwater
        for route in self.router.routes():
            await route.dispatcher.start()
            self._mark_serving(route.engine)
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="sluice-publisher"),
            asyncio.create_task(self._commit_loop(), name="sluice-committer"),
        ]
        if self.control is not None:
            self._tasks.append(asyncio.create_task(self.control.run(), name="sluice-control"))
        self.ready.set()

    async def stop(self, timeout: float = 30.0, commit_timeout: float = 5.0) -> None:
        """Finish what was accepted (bounded by ``timeout``), commit, stop the loops.

        Idempotent. The final commit is bounded too: at shutdown the consumer may already
        be going away, and an uncommitted offset only means a re-read that the answered
        index recognises.
        """
        if not self.ready.is_set() and not self._tasks:
            return
        self.ready.clear()
        logger.info("draining: %d requests unanswered", self._unfinished)
        for route in self.router.routes():
            await route.dispatcher.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("stopping with %d requests unanswered", self._unfinished)
        try:
            await asyncio.wait_for(self.commit_now(), commit_timeout)
        except Exception as exc:
            logger.warning("final commit failed (%r); those offsets will be re-read", exc)
        repairs = [*self._repairs, *self._tasks]
        for task in repairs:
            task.cancel()
        await asyncio.gather(*repairs, return_exceptions=True)
        self._tasks = []
        if self.holes is not None:
            try:
                await self.holes.close()
            except Exception as exc:
                logger.warning("closing the hole reader failed: %r", exc)
        if self.control is not None:
            await self.control.stop()

    # -- intake ------------------------------------------------------------------------
    async def handle(self, source: SourceRecord) -> None:
        """Take one record. Waits while ``max_inflight`` requests are unanswered."""
        if self.holes is not None and not self.watermarks.knows(source.tp):
            await self._start_partition(source.tp)
        await self._slots.acquire()
        self._unfinished += 1
        self._idle.clear()
        tracked = self.watermarks.track(source.tp, source.offset)
        if tracked.redelivery:
            self.metrics.redeliveries_total.inc()
        if tracked.hole is not None:
            self._repair_hole(source.tp, tracked.hole)
        self._positions[source.tp] = source.offset + 1
        self.metrics.inflight_requests.inc()
        read_ms = now_ms()
        try:
            _, record = self.codec.decode(source.value, expected="InferenceRequest")
        except SchemaError as exc:
            self._dead_letter(source, exc.reason_code, str(exc), request_id=None)
            return
        request_id = record["request_id"]
        if request_id in self.answered:
            self.metrics.duplicates_total.inc()
            self._finish([source])
            return
        if request_id in self._inflight:  # same request twice in the stream: answer once
            self.metrics.duplicates_total.inc()
            self._inflight[request_id].append(source)
            return
        try:
            request = self.admission.admit(record, source.timestamp_ms)
        except InvalidRequestError as exc:
            self._dead_letter(source, exc.reason_code, str(exc), request_id=request_id)
            return
        except Exception as exc:  # a tokenizer or other surprise: still one answer
            logger.exception("admission failed for %s", request_id)
            self._dead_letter(source, "invalid_request", f"admission failed: {exc}", request_id)
            return
        self._inflight[request_id] = [source]
        created_ms = record.get("created_at") or source.timestamp_ms or read_ms
        self.metrics.observe_stage("queue", (read_ms - created_ms) / 1000.0)
        route = self.router.pick(request_id)
        context = _Context(request_id, created_ms, read_ms, route.engine)
        if request.deadline is not None and request.deadline <= time.monotonic():
            self._publish_result(context, None, expired=True)
            return
        if route is not self.router.current:  # another version may tokenize differently
            request.prompt_ids = route.engine.encode_prompt(
                request.prompt, system=request.system, raw=request.raw
            )
        future = await route.dispatcher.submit(request)
        future.add_done_callback(lambda f: self._on_outcome(context, f))

    # -- records the stream skipped -----------------------------------------------------
    async def _start_partition(self, tp: Hashable) -> None:
        """First record of a newly assigned partition: learn where it should start."""
        assert self.holes is not None
        try:
            committed = await asyncio.wait_for(self.holes.committed(tp), 30.0)
        except Exception as exc:  # no check for this partition's first record, still correct
            logger.warning("committed offset of %s unknown (%r)", tp, exc)
            committed = None
        if not self.watermarks.knows(tp):
            self.watermarks.start(tp, committed)

    def _repair_hole(self, tp: Hashable, hole: tuple[int, int]) -> None:
        if self.holes is None:
            self.watermarks.close_hole(tp, hole)  # not checked: trust the stream
            return
        task = asyncio.create_task(self._read_hole(tp, hole, self._generation))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _read_hole(self, tp: Hashable, hole: tuple[int, int], generation: int) -> None:
        """Read the records the stream skipped and answer them; then release the mark."""
        assert self.holes is not None
        start, end = hole
        delay = 0.5
        while True:
            try:
                records = await self.holes.read(tp, start, end)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the mark stays at the hole: nothing is committed past
                logger.warning(
                    "reading skipped offsets %s [%d, %d) failed: %r", tp, start, end, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            if generation != self._generation:
                return
        if generation != self._generation:
            return  # revoked meanwhile: the new owner reads from the committed offset
        if records:
            self.metrics.skipped_records_total.inc(len(records))
            logger.warning(
                "the stream skipped %d records of %s in [%d, %d); answering them now",
                len(records),
                tp,
                start,
                end,
            )
        for record in records:
            await self.handle(record)
        self.watermarks.close_hole(tp, hole)

    # -- engines and versions ----------------------------------------------------------
    def _dispatcher_for(self, engine: Engine) -> Dispatcher:
        """A micro-batcher for batch engines; per-request dispatch for in-flight batching."""
        settings = self.settings
        if engine.inflight_batching:
            return InflightDispatcher(
                engine.generate_one,
                max_inflight=max(1, int(engine.max_batch_size * settings.trt_inflight_factor)),
            )

        async def run_batch(batch: Sequence[GenerationRequest]) -> list[Completion | BaseException]:
            self.metrics.batch_size.observe(len(batch))
            return await engine.generate(batch)

        return MicroBatcher(
            run_batch,
            max_batch_size=settings.batch_max_size,
            max_batch_tokens=settings.batch_max_tokens,
            max_wait_s=settings.batch_max_wait_ms / 1000.0,
            max_queue=settings.max_inflight,
        )

    async def _route(self, version: str | None) -> Route:
        if version is None:
            raise ValueError("the base model is always loaded")
        if self._load_version is None:
            raise ValueError(f"cannot load version {version}: no model registry configured")
        engine = await self._load_version(version)
        dispatcher = self._dispatcher_for(engine)
        await dispatcher.start()
        self._mark_serving(engine)
        return Route(version, engine, dispatcher)

    def _mark_serving(self, engine: Engine) -> None:
        self.metrics.model_info.labels(model=engine.model_name, version=engine.model_version).set(1)

    async def apply_control(self, command: dict[str, Any]) -> None:
        """Apply one rollout command (see :mod:`streams.rollout`); never raises."""
        try:
            state = await self.router.apply(command)
        except Exception:
            logger.exception("control command %s failed; rollout unchanged", command)
            return
        self.metrics.canary_percent.set(state.canary_percent if state.candidate else 0)
        self.metrics.model_info.clear()  # retired versions stop showing as served
        for route in self.router.routes():
            self._mark_serving(route.engine)

    def _on_outcome(self, context: _Context, future: asyncio.Future) -> None:
        if future.cancelled():
            outcome = BatchOutcome(None, RuntimeError("cancelled"), 0, 0.0, 0.0)
        else:
            outcome = future.result()
        self._publish_result(context, outcome)

    # -- output ------------------------------------------------------------------------
    def _publish_result(
        self, context: _Context, outcome: BatchOutcome | None, expired: bool = False
    ) -> None:
        request_id, created_ms, read_ms, engine = context
        record = result_record(
            request_id=request_id,
            model=engine.model_name,
            model_version=engine.model_version,
            outcome=outcome,
            created_ms=created_ms,
            read_ms=read_ms,
            worker=self.settings.worker_id,
            expired=expired,
        )
        self._record_metrics(record, outcome)
        sources = self._inflight.get(request_id, [])
        self._outbox.put_nowait(
            _Outgoing(
                self.settings.results_topic,
                request_id.encode(),
                self.codec.encode("InferenceResult", record),
                sources,
                request_id=request_id,
            )
        )

    def _dead_letter(
        self, source: SourceRecord, code: str, reason: str, request_id: str | None
    ) -> None:
        self.metrics.dlq_total.labels(reason=code).inc()
        logger.info(
            "dead-lettering %s/%d@%d: %s", source.topic, source.partition, source.offset, reason
        )
        record = dead_letter(
            source, code, reason, request_id=request_id, worker=self.settings.worker_id
        )
        self._outbox.put_nowait(
            _Outgoing(
                self.settings.dlq_topic,
                source.key,
                self.codec.encode("DeadLetter", record),
                [source],
            )
        )

    def _record_metrics(self, record: dict[str, Any], outcome: BatchOutcome | None) -> None:
        m = self.metrics
        m.child(m.requests_total, record["model"], record["status"]).inc()
        m.child(m.results_by_version_total, record["model_version"], record["status"]).inc()
        timings = record["timings"]
        m.observe_stage("total", timings["total_ms"] / 1000.0)
        if outcome is not None and not outcome.expired:
            m.observe_stage("batch_wait", outcome.batch_wait_s)
            m.observe_stage("inference", outcome.inference_s)
        m.child(m.tokens_total, "prompt").inc(record["prompt_tokens"])
        m.child(m.tokens_total, "completion").inc(record["completion_tokens"])

    async def _publish_loop(self) -> None:
        assert self._producer is not None
        while True:
            item = await self._outbox.get()
            try:
                delivery = await self._producer.send(
                    item.topic, item.key, item.value, None, None, None
                )
            except Exception as exc:
                self._retry(item, exc)
                continue
            asyncio.ensure_future(delivery).add_done_callback(
                lambda f, item=item: self._on_delivery(item, f)
            )

    def _on_delivery(self, item: _Outgoing, delivery: asyncio.Future) -> None:
        error = delivery.exception() if not delivery.cancelled() else RuntimeError("cancelled")
        if error is not None:
            self._retry(item, error)
            return
        if item.request_id is not None:
            self.answered.add(item.request_id)
            self._inflight.pop(item.request_id, None)
        self._finish(item.sources)

    def _retry(self, item: _Outgoing, error: BaseException) -> None:
        """A send failed: keep the offset unfinished and try again with backoff."""
        item.attempts += 1
        self.metrics.publish_retries_total.inc()
        delay = min(0.1 * 2 ** min(item.attempts, 8), 10.0)
        logger.warning(
            "send to %s failed (%s); retry %d in %.1fs", item.topic, error, item.attempts, delay
        )
        asyncio.get_running_loop().call_later(delay, self._outbox.put_nowait, item)

    def _finish(self, sources: list[SourceRecord]) -> None:
        for source in sources:
            self.watermarks.finish(source.tp, source.offset)
            self._slots.release()
            self._unfinished -= 1
            self.metrics.inflight_requests.dec()
        if self._unfinished == 0:
            self._idle.set()

    # -- commits -----------------------------------------------------------------------
    async def _commit_loop(self) -> None:
        interval = self.settings.commit_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.commit_now(), 30.0)
            except Exception:
                logger.exception("offset commit failed; will retry")
            self._update_lag()

    def _update_lag(self) -> None:
        if self._highwater is None:
            return
        for tp, position in list(self._positions.items()):
            end = self._highwater(tp)
            if end is not None:
                partition = getattr(tp, "partition", tp)
                self.metrics.consumer_lag.labels(partition=str(partition)).set(end - position)

    async def commit_now(self) -> dict[Hashable, int]:
        """Commit every partition's watermark that moved. Returns what was committed."""
        offsets = self.watermarks.committable()
        if not offsets or self._committer is None:
            return {}
        if await self._committer(offsets):
            self.watermarks.mark_committed(offsets)
            self.metrics.commits_total.inc()
            return offsets
        return {}

    async def on_partitions_revoked(self, tps: set[Hashable]) -> None:
        """Before a rebalance takes partitions away: commit what is done, then forget them."""
        self._generation += 1
        try:
            await self.commit_now()
        finally:
            self.watermarks.forget(tps)
            for tp in tps:
                self._positions.pop(tp, None)
